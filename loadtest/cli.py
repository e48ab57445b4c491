"""Command line: `attnserve loadtest [sweep] ...` and `python -m loadtest [sweep] ...`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import shlex
from pathlib import Path

from loadtest.prompts import DEFAULT_TOKEN_ID_RANGE, TextTokenizer
from loadtest.protocols import ENDPOINT_PATHS, SamplingOptions
from loadtest.report import format_run_summary
from loadtest.runner import RunConfig, run_benchmark
from loadtest.schedule import parse_rate
from loadtest.server_process import ServerStartError, default_server_command
from loadtest.stats import parse_goodput
from loadtest.sweep import (
    SweepSettings,
    load_server_configs,
    parse_server_config,
    run_sweep,
)
from loadtest.workloads import (
    SHARED_PREFIX_ORDERS,
    WORKLOADS,
    Trace,
    WorkloadOptions,
    build_trace,
)

logger = logging.getLogger("loadtest")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("requests")
    g.add_argument("--endpoint", choices=list(ENDPOINT_PATHS), default="completions",
                   help="completions (/v1/completions), chat (/v1/chat/completions), generate "
                        "(attnserve's /generate) or sglang (SGLang's /generate); every request "
                        "streams; default completions")
    g.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' on every request (default: "
                        "$OPENAI_API_KEY, if set)")
    g.add_argument("--model", default=None,
                   help="model field of the requests (default: the first of GET /v1/models)")
    g.add_argument("--num-prompts", type=int, default=100,
                   help="requests (random) or conversations (multi-turn) in the trace (default 100)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the trace and the arrival times: same seed, same trace")
    g.add_argument("--warmup", type=int, default=0,
                   help="requests sent (with other prompts) before the measured run")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals; 1 is a Poisson process")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no limit)")
    g.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:4000 (milliseconds)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the requests (default 0: greedy)")
    g.add_argument("--no-ignore-eos", action="store_true",
                   help="do not ask for exact output lengths (ignore_eos)")
    g.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request counts as failed (default 600)")
    g.add_argument("--metric-percentiles", default="90,95,99",
                   help="comma-separated percentiles reported besides mean and median")
    g.add_argument("--save-detailed", action="store_true",
                   help="keep per-request arrays (ttfts, itls, ...) in the JSON")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    g.add_argument("--log-level", default="info",
                   help="debug, info, warning or error (default info)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="random prompts, shared-prefix groups, multi-turn chats, or a JSONL "
                        "--file (default random)")
    w.add_argument("--input-len", type=int, default=1024,
                   help="prompt tokens per request (random) or per user turn (multi-turn); "
                        "default 1024")
    w.add_argument("--output-len", type=int, default=128,
                   help="tokens asked per answer (default 128)")
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    w.add_argument("--num-groups", type=int, default=64,
                   help="shared-prefix: groups, each with its own system prompt (default 64)")
    w.add_argument("--prompts-per-group", type=int, default=16,
                   help="shared-prefix: questions per group (default 16)")
    w.add_argument("--system-prompt-len", type=int, default=2048,
                   help="shared-prefix: tokens of each group's shared prefix (default 2048)")
    w.add_argument("--question-len", type=int, default=128,
                   help="shared-prefix: tokens of each question after the prefix (default 128)")
    w.add_argument("--text-prompts", action="store_true",
                   help="send text prompts to /v1/completions and /generate as well (default: "
                        "token ids there, exact lengths); a router that routes by request "
                        "text, as SGLang's cache-aware one does, needs text")
    w.add_argument("--shared-prefix-order", choices=SHARED_PREFIX_ORDERS, default="random",
                   help="shared-prefix: 'random' shuffles all prompts with the seed, as SGLang's "
                        "generated-shared-prefix does; 'grouped' sends group after group "
                        "(default random)")
    w.add_argument("--turns", type=int, default=3,
                   help="multi-turn: user turns per conversation (default 3)")
    w.add_argument("--file", default=None, help="JSONL for --workload file")
    w.add_argument("--tokenizer", default=None,
                   help="HF name, folder or .gguf file; makes text prompts length-exact")
    w.add_argument("--vocab-size", type=int, default=None,
                   help="sample prompt ids from [min(1000, V/10), 0.9 V)")
    w.add_argument("--token-id-range", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="prompt token ids drawn from [LOW, HIGH) (default: from --vocab-size "
                        "or --tokenizer, else 1000 30000)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    run = argparse.ArgumentParser(
        prog="attnserve loadtest",
        description="Replay a request trace against an OpenAI-compatible server "
                    "(subcommand 'sweep': against several attnserve configurations).")
    run.add_argument("--base-url", default="http://127.0.0.1:8000",
                     help="the server to load (default http://127.0.0.1:8000)")
    run.add_argument("--request-rate", type=parse_rate, default=float("inf"),
                     help="requests per second, or inf (all at once)")
    run.add_argument("--output", default=None, help="write the result JSON here")
    run.add_argument("--reset-prefix-cache", action="store_true",
                     help="empty the server's prefix cache after the warm-up (POST "
                          "/reset_prefix_cache, else SGLang's /flush_cache); the JSON's "
                          "prefix_cache_cold says whether it worked")
    _add_common(run)
    sweep = argparse.ArgumentParser(
        prog="attnserve loadtest sweep",
        description="For each server configuration: start attnserve on a free loopback port, "
                    "wait for /health, replay the trace at each rate, stop it.")
    sweep.add_argument("--server-config", action="append", default=[], metavar="NAME=FLAGS",
                       help="repeatable, e.g. 'hnd16=--kv-layout hnd --page-size 16'")
    sweep.add_argument("--configs", default=None,
                       help='JSON list of {"name": ..., "args": "flags" | [..] | {..}}')
    sweep.add_argument("--request-rates", type=parse_rate, nargs="+", default=[float("inf")],
                       help="requests per second to replay the trace at, each a run; inf = "
                            "all at once (default inf)")
    sweep.add_argument("--server-args", default="", help="flags given to every configuration")
    sweep.add_argument("--server-command", default=None,
                       help="how to start the server (default: python -m server serve)")
    sweep.add_argument("--host", default="127.0.0.1", help="address the servers listen on")
    sweep.add_argument("--startup-timeout", type=float, default=300.0,
                       help="seconds a server may take to answer /health (default 300)")
    sweep.add_argument("--restart-per-rate", action="store_true",
                       help="a fresh server for every rate (default: one server per "
                            "configuration, its prefix cache emptied before each rate)")
    sweep.add_argument("--keep-prefix-cache", action="store_true",
                       help="do not empty the prefix cache between rates: a later rate may hit "
                            "what an earlier one cached (each JSON says prefix_cache_cold)")
    sweep.add_argument("--output-dir", default="loadtest-results",
                       help="results, plots and server logs go here (default loadtest-results)")
    _add_common(sweep)
    return run, sweep


def _token_id_range(args: argparse.Namespace, tokenizer: TextTokenizer | None
                    ) -> tuple[int, int]:
    if args.token_id_range:
        low, high = args.token_id_range
    elif args.vocab_size or tokenizer is not None:
        vocab = args.vocab_size or tokenizer.vocab_size  # type: ignore[union-attr]
        low, high = min(1000, vocab // 10), int(vocab * 0.9)
    else:
        low, high = DEFAULT_TOKEN_ID_RANGE
    if not 0 <= low < high:
        raise ValueError(f"bad token id range [{low}, {high})")
    return low, high


def _traces(args: argparse.Namespace) -> tuple[Trace, Trace | None]:
    tokenizer = TextTokenizer.load(args.tokenizer) if args.tokenizer else None
    opts = WorkloadOptions(
        name=args.workload, num_prompts=args.num_prompts, seed=args.seed,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
        system_prompt_len=args.system_prompt_len, question_len=args.question_len,
        shared_prefix_order=args.shared_prefix_order, turns=args.turns, file=args.file,
        token_id_range=_token_id_range(args, tokenizer),
        use_token_ids=args.endpoint != "chat" and not args.text_prompts)
    trace = build_trace(opts, tokenizer)
    if (args.endpoint == "chat" or args.text_prompts) and tokenizer is None:
        trace.notes.append("text prompts are words, not token ids: lengths are approximate "
                           "(give --tokenizer for exact text lengths; the chat template adds more)")
    warmup = None
    if args.warmup > 0:
        # Other prompts than the trace's, so warm-up does not fill the prefix cache for it.
        warm_opts = dataclasses.replace(opts, seed=opts.seed + 1_000_003,
                                        num_prompts=args.warmup)
        warmup = build_trace(warm_opts, tokenizer)
        warmup.conversations = warmup.conversations[: args.warmup]
    return trace, warmup


def _run_config(args: argparse.Namespace, base_url: str, rate: float) -> RunConfig:
    return RunConfig(
        base_url=base_url, endpoint=args.endpoint, model=args.model, request_rate=rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
        sampling=SamplingOptions(temperature=args.temperature,
                                 ignore_eos=not args.no_ignore_eos,
                                 extra_body=json.loads(args.extra_body) if args.extra_body
                                 else {}),
        percentiles=tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip()),
        goodput_slos_ms=parse_goodput(args.goodput), request_timeout_s=args.request_timeout,
        show_progress=not args.disable_tqdm, save_detailed=args.save_detailed,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        reset_prefix_cache=getattr(args, "reset_prefix_cache", False))


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


def _main_run(argv: list[str]) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        cfg = _run_config(args, args.base_url.rstrip("/"), args.request_rate)
        trace, warmup = _traces(args)
    except (ValueError, OSError, RuntimeError) as exc:
        parser.error(str(exc))
    result = asyncio.run(run_benchmark(cfg, trace, warmup))
    reset = result.get("prefix_cache_reset") or {}
    if reset and reset.get("status") != "reset":
        logger.warning("the prefix cache could not be emptied (%s); this run is on a warm "
                       "cache (prefix_cache_cold: false)", reset.get("detail"))
    print(format_run_summary(result, cfg.percentiles))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"result written to {args.output}")
    return 0 if result["completed"] > 0 else 1


def _main_sweep(argv: list[str]) -> int:
    _, parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        configs = [parse_server_config(c) for c in args.server_config]
        if args.configs:
            configs += load_server_configs(args.configs)
        if not configs:
            raise ValueError("give at least one --server-config NAME=FLAGS or --configs FILE")
        if args.keep_prefix_cache and args.restart_per_rate:
            raise ValueError("--keep-prefix-cache and --restart-per-rate contradict each other "
                             "(a fresh server has an empty cache)")
        cfg = _run_config(args, "", args.request_rates[0])
        trace, warmup = _traces(args)
    except (ValueError, OSError, RuntimeError) as exc:
        parser.error(str(exc))
    settings = SweepSettings(
        configs=configs, rates=list(args.request_rates), output_dir=Path(args.output_dir),
        common_args=shlex.split(args.server_args),
        server_command=shlex.split(args.server_command) if args.server_command
        else default_server_command(),
        host=args.host, startup_timeout_s=args.startup_timeout,
        restart_per_rate=args.restart_per_rate, keep_prefix_cache=args.keep_prefix_cache)
    try:
        runs, failures = run_sweep(settings, cfg, trace, warmup)
    except ServerStartError as exc:  # raised only if stopping fails in an odd way
        print(f"sweep failed: {exc}")
        return 1
    print((settings.output_dir / "summary.md").read_text())
    print(f"{len(runs)} runs written to {settings.output_dir}")
    for failure in failures:
        print(f"configuration failed: {failure}")
    return 1 if failures or not runs else 0


def main(argv: list[str]) -> int:
    """Entry point for `attnserve loadtest ...` (argv is everything after 'loadtest')."""
    if argv and argv[0] == "sweep":
        return _main_sweep(argv[1:])
    return _main_run(argv)
