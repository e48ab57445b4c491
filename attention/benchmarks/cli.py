"""`attnserve bench attention ...`: the kernel benchmarks' entry point.

    attnserve bench attention --op decode  [decode flags]   (attention.benchmarks.decode)
    attnserve bench attention --op prefill [prefill flags]  (attention.benchmarks.prefill)
    attnserve bench attention --op extend  [extend flags]   (attention.benchmarks.prefill)

Everything after `--op OP` goes to that benchmark's own parser (`--help` lists its flags).
The benchmark modules are imported only when chosen: they need a GPU and triton.
"""

from __future__ import annotations

import argparse
import logging

OPS = ("decode", "prefill", "extend")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="attnserve bench attention",
        description="Attention kernel benchmarks on the GPU (see --op OP --help for each).",
    )
    ap.add_argument("--op", choices=OPS, required=True, help="which kernel family to measure")
    ap.add_argument("--log-level", default="INFO")
    args, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.op == "decode":
        from attention.benchmarks.decode import main as decode_main

        return decode_main(rest)
    from attention.benchmarks import prefill

    # the prefill benchmark serves both ops and takes --op itself
    result = prefill.main([*rest, "--op", args.op])
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
