"""`attnserve bench attention ...`: the kernel benchmarks' entry point.

    attnserve bench attention --op decode  [decode flags]   (bench.attention.decode)
    attnserve bench attention --op prefill [prefill flags]  (bench.attention.prefill)
    attnserve bench attention --op extend  [extend flags]   (bench.attention.prefill)
    attnserve bench attention --op rope_store [flags]       (bench.attention.rope_store)
    attnserve bench attention --op mla-decode|mla-prefill   (bench.attention.mla)
    attnserve bench attention --op linear-decode|linear-prefill   (bench.attention.linear)

Everything after `--op OP` goes to that benchmark's own parser (`--help` lists its flags).
The benchmark modules are imported only when chosen: they need a GPU and triton.
"""

from __future__ import annotations

import argparse
import logging

OPS = ("decode", "prefill", "extend", "rope_store", "mla-decode", "mla-prefill",
       "linear-decode", "linear-prefill")


def main(argv: list[str]) -> int:
    # --help is handled by hand: with --op it belongs to that benchmark's own parser
    ap = argparse.ArgumentParser(
        prog="attnserve bench attention", add_help=False,
        description="Attention kernel benchmarks on the GPU (--op OP --help lists each one's "
                    "flags).",
    )
    ap.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    ap.add_argument("--op", choices=OPS, help="which kernel family to measure (required)")
    ap.add_argument("--log-level", default="INFO",
                    help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    args, rest = ap.parse_known_args(argv)
    if args.op is None:
        if args.help:
            ap.print_help()
            return 0
        ap.error("--op is required")
    if args.help:
        rest = [*rest, "--help"]
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.op == "decode":
        from bench.attention.decode import main as decode_main

        return decode_main(rest)
    if args.op in ("mla-decode", "mla-prefill"):
        from bench.attention.mla import main as mla_main

        return mla_main([*rest, "--op", args.op])
    if args.op in ("linear-decode", "linear-prefill"):
        from bench.attention.linear import main as linear_main

        return linear_main([*rest, "--op", args.op])
    if args.op == "rope_store":
        from bench.attention.rope_store import main as rope_store_main

        return rope_store_main(rest)
    from bench.attention import prefill

    # the prefill benchmark serves both ops and takes --op itself
    result = prefill.main([*rest, "--op", args.op])
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
