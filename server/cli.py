"""The `attnserve` command: serve, generate, bench, loadtest."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from server.engine.args import add_engine_args, engine_config_from_args

LOG_LEVELS = ["debug", "info", "warning", "error"]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top prob")
    g.add_argument("--seed", dest="sampling_seed", type=int, default=None,
                   help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")


def _cmd_generate(args: argparse.Namespace) -> int:
    from server.engine import LLM, SamplingParams

    llm = LLM(engine_config_from_args(args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    results = llm.generate(args.prompts, params, chat=not args.raw)
    for prompt, r in zip(args.prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": r.text, "token_ids": r.token_ids,
                              "finish_reason": r.finish_reason}))
        else:
            print(r.text)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import run_server

    return run_server(engine_config_from_args(args), args)


def _cmd_bench(args: argparse.Namespace) -> int:
    # The one import of `bench` from a runtime package: `bench` sits on top of them all, so
    # it is imported here, when the command runs, never when `server` is imported
    # (tests/test_import_graph.py allows exactly this edge).
    from bench.cli import main as bench_main

    return bench_main(args.what, args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnserve",
        description="Continuous-batching LLM server for measuring attention kernels and KV layouts.",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    from server.api.args import add_server_args

    add_server_args(serve)

    gen = sub.add_parser("generate", help="generate offline for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text (the chat template is applied)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: text, token_ids, finish_reason")
    add_engine_args(gen)
    _add_sampling_args(gen)

    bench = sub.add_parser("bench", help="offline benchmarks: throughput, prefix, attention")
    bench.add_argument("what", choices=["throughput", "prefix", "attention"],
                       help="throughput: attnserve vs transformers; prefix: cache on vs off; "
                            "attention: kernel benchmarks (GPU; see `bench attention --help`)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    lt = sub.add_parser("loadtest", help="load generator and config sweeps (see `loadtest --help`)")
    lt.add_argument("rest", nargs=argparse.REMAINDER, help="the load generator's flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "loadtest":  # the load generator owns all its flags, --help too
        from loadtest.cli import main as loadtest_main

        return loadtest_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "generate":
        return _cmd_generate(args)
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "loadtest":
        from loadtest.cli import main as loadtest_main

        return loadtest_main(args.rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
