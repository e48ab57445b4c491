"""The `attnserve` command: serve, generate, router, bench, loadtest."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import socket
import sys
from typing import TYPE_CHECKING

from server.engine.args import add_engine_args, engine_config_from_args

if TYPE_CHECKING:
    from server.engine import LLM

LOG_LEVELS = ["debug", "info", "warning", "error"]


def _fail(message: str) -> int:
    """A start-up error the user can fix: one line on stderr, exit status 2 (as argparse)."""
    print(f"attnserve: error: {message}", file=sys.stderr, flush=True)
    return 2


def engine_problem(args: argparse.Namespace) -> str | None:
    """What makes these engine flags unusable, found before anything loads, or None: a model
    or tokenizer that is not there (a Hugging Face Hub id included), a chat template that is
    neither a file nor a template, a GPU that is not there, a refused flag combination."""
    from model.loader import ModelSpecError, check_tokenizer_spec, resolve_model_spec

    try:
        config = engine_config_from_args(args)
        resolve_model_spec(config.model)
        if config.tokenizer is not None:
            check_tokenizer_spec(config.tokenizer)
        config.resolved_chat_template()
        config.resolved_dtype()
    except (ModelSpecError, ValueError, OSError) as e:
        return str(e)
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return f"--device {config.device}: no CUDA device is available"
    from server.engine.tensor_parallel import tensor_parallel_problem

    try:
        return tensor_parallel_problem(config)
    except (ModelSpecError, ValueError, OSError) as e:
        return str(e)


def bind_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None: checked by binding (and
    releasing) the address before the model loads, so a busy port or a wrong host ends the
    start at once with one line rather than a traceback after the load."""
    if not 0 <= port <= 65535:
        return f"--port {port}: ports are 0-65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return f"--host {host!r}: cannot resolve it ({e})"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except PermissionError:
            return f"--port {port}: permission denied (ports below 1024 need privileges)"
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"--port {port}: address {host}:{port} is already in use"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"--host {host!r}: not an address of this machine"
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS \
                or not action.option_strings:
            return text
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction):
            shown = "on" if default else "off"
        elif isinstance(default, list):
            shown = ", ".join(map(str, default)) or "none"
        else:
            shown = "none" if default is None else "%(default)s"
        return f"{text} (default: {shown})"


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top prob")
    g.add_argument("--sampling-seed", type=int, default=None,
                   help="every prompt's own sampling seed (--seed seeds the engine: prompts "
                        "without one)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token generated so far")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence in the generated tokens")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divides positive (multiplies negative) logits of prompt and "
                        "generated tokens")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="tokens generated before EOS or a stop may end the output")


def _cmd_generate(args: argparse.Namespace) -> int:
    from server.engine import LLM

    llm = LLM(engine_config_from_args(args))
    try:
        return _generate(llm, args)
    finally:
        llm.shutdown()  # tensor-parallel ranks, if any


def _generate(llm: LLM, args: argparse.Namespace) -> int:
    from server.engine import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop,
        ignore_eos=args.ignore_eos, n=args.n, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        min_tokens=args.min_tokens,
    )
    try:
        params.validate()
    except ValueError as e:
        return _fail(str(e))
    results = llm.generate(args.prompts, params, chat=not args.raw)
    for i, r in enumerate(results):
        prompt = args.prompts[i // args.n]
        if args.json:
            print(json.dumps({"prompt": prompt, "index": i % args.n, "text": r.text,
                              "token_ids": r.token_ids, "finish_reason": r.finish_reason}))
        else:
            print(r.text)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.api.app import run_server

    problem = bind_problem(args.host, args.port)
    if problem is not None:
        return _fail(problem)
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
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                           formatter_class=HelpFormatter)
    add_engine_args(serve)
    from server.api.args import add_server_args

    add_server_args(serve)
    for action in serve._actions:  # serve's --log-level defers to the top-level one
        if action.dest == "log_level":
            action.help = f"{action.help} (default: info, or the value before `serve`)"

    gen = sub.add_parser("generate", help="generate offline for one or more prompts",
                         formatter_class=HelpFormatter)
    gen.add_argument("prompts", nargs="+", help="prompt text (the chat template is applied)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt: text, token_ids, finish_reason")
    add_engine_args(gen)
    _add_sampling_args(gen)

    bench = sub.add_parser("bench",
                           help="offline benchmarks: throughput, prefix, attention, step")
    bench.add_argument("what", choices=["throughput", "prefix", "attention", "step"],
                       help="throughput: attnserve vs transformers; prefix: cache on vs off; "
                            "attention: kernel benchmarks (GPU; see `bench attention --help`); "
                            "step: a decode step's parts against its bandwidth floor")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")

    router = sub.add_parser("router", help="N workers behind SGLang's cache-aware router, one "
                                           "URL (see `router --help`)")
    router.add_argument("rest", nargs=argparse.REMAINDER,
                        help="the router's flags, then `serve` flags for every worker")

    lt = sub.add_parser("loadtest", help="load generator and config sweeps (see `loadtest --help`)")
    lt.add_argument("rest", nargs=argparse.REMAINDER, help="the load generator's flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "loadtest":  # the load generator owns all its flags, --help too
        from loadtest.cli import main as loadtest_main

        return loadtest_main(argv[1:])
    if argv and argv[0] == "router":  # the router owns its flags; the rest go to the workers
        from server.router.cli import main as router_main

        return router_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if args.command in ("generate", "serve"):
        problem = engine_problem(args)
        if problem is not None:
            return _fail(problem)
    if args.command == "generate":
        return _cmd_generate(args)
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "bench":
        return _cmd_bench(args)
    if args.command == "loadtest":
        from loadtest.cli import main as loadtest_main

        return loadtest_main(args.rest)
    if args.command == "router":
        from server.router.cli import main as router_main

        return router_main(args.rest)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
