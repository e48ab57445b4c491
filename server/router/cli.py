"""`attnserve router --replicas N [router flags] [serve flags]`: the flags, checked before
anything starts, and the replica set they describe (server/router/supervisor.py)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import sys

from server.router.supervisor import ReplicaSet, RouterSettings, gpu_assignment

logger = logging.getLogger(__name__)
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
# Set by the router for each worker; a serve flag for them would be overridden.
RESERVED_SERVE_FLAGS = ("--host", "--port", "--replica-name")
ROUTER_PACKAGE = "sglang_router"


def build_parser() -> argparse.ArgumentParser:
    from server.cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="attnserve router", formatter_class=HelpFormatter, allow_abbrev=False,
        description="N attnserve workers on loopback ports behind SGLang's cache-aware router "
                    "(pip install 'attnserve[router]'), one URL for clients. Flags not listed "
                    "here are `attnserve serve` flags, given to every worker.")
    p.add_argument("--replicas", type=int, default=2,
                   help="attnserve workers to start here, each its own process and engine (on "
                        "a GPU machine, worker i gets GPU i)")
    p.add_argument("--worker-url", action="append", default=[],
                   help="a worker already running elsewhere, e.g. http://10.0.0.2:8000 "
                        "(repeatable; with --replicas 0 the router serves only these)")
    p.add_argument("--host", default="127.0.0.1", help="address the router binds")
    p.add_argument("--port", type=int, default=8000, help="port the router binds")
    p.add_argument("--policy", default="cache_aware", choices=POLICIES,
                   help="routing policy: cache_aware (an approximate radix tree of request "
                        "text per worker), round_robin, power_of_two, random")
    p.add_argument("--health-check-interval", type=int, default=1,
                   help="seconds between the router's GET /health of each worker")
    p.add_argument("--health-failure-threshold", type=int, default=2,
                   help="failed health checks in a row that take a worker out of the pool")
    p.add_argument("--router-metrics-port", type=int, default=0,
                   help="port of the router's own Prometheus /metrics (0: a free port)")
    p.add_argument("--router-command", default=None,
                   help="the router's launcher (default: this Python's -m "
                        "sglang_router.launch_router)")
    p.add_argument("--router-arg", action="append", default=[],
                   help="one more flag for the router, e.g. --router-arg=--cache-threshold=0.5 "
                        "(repeatable)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds the workers and the router have to become ready")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level of this process and the workers")
    return p


def _worker_flags_problem(flags: list[str]) -> str | None:
    """Why these serve flags cannot be given to the workers, or None (checked with serve's
    own parser and start-up check, so a typo ends the command before anything starts)."""
    from server.cli import build_parser as serve_parsers
    from server.cli import engine_problem

    for flag in flags:
        if flag.split("=", 1)[0] in RESERVED_SERVE_FLAGS:
            return f"{flag.split('=', 1)[0]}: set by `attnserve router` for each worker"
    parser = serve_parsers()
    try:
        args = parser.parse_args(["serve", *flags])
    except SystemExit:
        return "the serve flags above are not valid"
    return engine_problem(args)


def _flag_value(flags: list[str], name: str) -> str | None:
    """The last value of `name` among serve flags (`--name V` or `--name=V`), or None."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def main(argv: list[str]) -> int:
    parser = build_parser()
    args, serve_flags = parser.parse_known_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls
    if args.replicas < 0 or (args.replicas == 0 and not args.worker_url):
        parser.error("--replicas must be at least 1, or 0 with --worker-url")
    if args.router_command is None and importlib.util.find_spec(ROUTER_PACKAGE) is None:
        print("attnserve: error: SGLang's router is not installed: pip install "
              "'attnserve[router]' (or give --router-command)", file=sys.stderr)
        return 2
    problem = _worker_flags_problem(serve_flags) if args.replicas else None
    if problem is not None:
        print(f"attnserve: error: {problem}", file=sys.stderr)
        return 2
    router_command = shlex.split(args.router_command) if args.router_command \
        else [sys.executable, "-m", f"{ROUTER_PACKAGE}.launch_router"]
    # A worker keeps serving while its /health fails for this long after SIGTERM, so the
    # router has taken it out of the pool before it refuses anything.
    leave_delay = args.health_check_interval * args.health_failure_threshold + 2
    worker_command = [sys.executable, "-m", "server", "--log-level", args.log_level, "serve",
                      "--leave-pool-delay", str(leave_delay), *serve_flags]
    # With an API key the router asks clients for the same key and passes it on to the
    # workers, which check it.
    api_key = _flag_value(serve_flags, "--api-key")
    settings = RouterSettings(
        command=router_command, host=args.host, port=args.port, policy=args.policy,
        metrics_port=args.router_metrics_port,
        health_check_interval_s=args.health_check_interval,
        health_failure_threshold=args.health_failure_threshold,
        # The router logs every request and workflow step at info: warn unless debugging.
        extra_args=["--log-level", "debug" if args.log_level == "debug" else "warn",
                    *(["--api-key", api_key] if api_key else []), *args.router_arg])
    replicas = ReplicaSet(worker_command, args.replicas, settings, args.worker_url,
                          gpu_assignment(args.replicas, _flag_value(serve_flags, "--device")),
                          startup_timeout_s=args.startup_timeout)
    return replicas.run()
