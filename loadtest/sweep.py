"""Config sweeps: the same trace against several server configurations and request rates."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.cache_plot import write_prefix_cache_plot
from loadtest.plots import write_sweep_plots
from loadtest.report import (
    configurations_markdown,
    replicas_markdown,
    step_split_markdown,
    sweep_markdown,
)
from loadtest.runner import RunConfig, run_benchmark
from loadtest.server_process import ServerProcess, ServerStartError
from loadtest.workloads import Trace

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """A named set of server flags, e.g. ('nhd16', ['--kv-layout', 'nhd', '--page-size', '16'])."""

    name: str
    args: list[str]


def _args_from_mapping(mapping: dict[str, Any]) -> list[str]:
    """{'kv_layout': 'hnd', 'no_prefix_cache': True} -> --kv-layout hnd --no-prefix-cache."""
    args: list[str] = []
    for key, value in mapping.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def parse_server_config(text: str) -> ServerConfig:
    """'NAME=--flag value ...' (a shell-quoted flag string after the first '=')."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--server-config takes NAME=FLAGS, got {text!r}")
    return ServerConfig(name.strip(), shlex.split(flags))


def load_server_configs(path: str) -> list[ServerConfig]:
    """A JSON list of {"name": ..., "args": "flags" | [flags] | {"kv_layout": "hnd", ...}}."""
    configs = []
    for i, entry in enumerate(json.loads(Path(path).read_text())):
        args = entry.get("args", [])
        if isinstance(args, str):
            args = shlex.split(args)
        elif isinstance(args, dict):
            args = _args_from_mapping(args)
        configs.append(ServerConfig(str(entry.get("name", f"config{i}")), [str(a) for a in args]))
    return configs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def _rate_slug(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


@dataclass
class SweepSettings:
    configs: list[ServerConfig]
    rates: list[float]
    output_dir: Path
    common_args: list[str]
    server_command: list[str]
    host: str = "127.0.0.1"
    startup_timeout_s: float = 300.0
    restart_per_rate: bool = False  # a fresh server for every rate
    keep_prefix_cache: bool = False  # no reset between rates: a later rate may hit the cache


@dataclass
class _ServerRuns:
    """What one server did: its runs, how many rates it used up, and whether it turned out
    to have no prefix-cache reset."""

    runs: list[dict[str, Any]]
    rates_used: int
    no_reset: bool = False


def _mark_cache(result: dict[str, Any], position: int) -> None:
    """Whether the run started on a cold prefix cache: emptied by the reset, or a server
    that had served no run before (its warm-up used other prompts)."""
    if result.get("prefix_cache_cold_by") == "reset":
        return
    result["prefix_cache_cold"] = position == 0
    result["prefix_cache_cold_by"] = "fresh server" if position == 0 else None


def _run_on_server(settings: SweepSettings, config: ServerConfig, rates: list[float],
                   run_cfg: RunConfig, trace: Trace, warmup: Trace | None,
                   failures: list[str], restarting: bool) -> _ServerRuns:
    """The rates on one server, in order; stops early when the server cannot reset its cache
    (then the caller restarts it for the remaining rates)."""
    args = [*settings.common_args, *config.args]
    suffix = f"_rate-{_rate_slug(rates[0])}" if restarting else ""
    log = settings.output_dir / f"server_{_slug(config.name)}{suffix}.log"
    out = _ServerRuns([], 0)
    with ServerProcess(args, log, settings.host, settings.server_command,
                       settings.startup_timeout_s) as server:
        for position, rate in enumerate(rates):
            out.rates_used += 1
            cfg = replace(run_cfg, base_url=server.base_url, request_rate=rate)
            logger.info("config %s, rate %s", config.name, _rate_slug(rate))
            try:
                result = asyncio.run(run_benchmark(cfg, trace, warmup))
            except RuntimeError as exc:  # e.g. every warm-up request failed
                failures.append(f"{config.name} at rate {_rate_slug(rate)}: {exc}")
                continue
            _mark_cache(result, position)
            result["prefix_cache_mode"] = "restart" if restarting else \
                "keep" if settings.keep_prefix_cache else "reset"
            result["config_name"] = config.name
            result["server_launch"] = {"command": server.full_command(), "args": args,
                                       "runs_served_before": position}
            path = settings.output_dir / f"{_slug(config.name)}_rate-{_rate_slug(rate)}.json"
            path.write_text(json.dumps(result, indent=2))
            out.runs.append(result)
            reset = result.get("prefix_cache_reset") or {}
            if reset.get("status") == "unsupported":
                out.no_reset = True
                break
            if reset.get("status") == "failed":
                logger.warning("config %s: the prefix cache reset failed (%s); rate %s ran on "
                               "a warm cache", config.name, reset.get("detail"),
                               _rate_slug(rate))
    return out


def _run_config(settings: SweepSettings, config: ServerConfig, run_cfg: RunConfig,
                trace: Trace, warmup: Trace | None, failures: list[str],
                warned: list[bool]) -> list[dict[str, Any]]:
    """Every rate of one configuration, each on a cold prefix cache unless
    ``keep_prefix_cache``: one server reset between rates, or a fresh server per rate
    (``restart_per_rate``, or a server without a reset endpoint)."""
    pending = list(settings.rates)
    restarting = settings.restart_per_rate
    runs: list[dict[str, Any]] = []
    while pending:
        rates = pending[:1] if restarting else pending
        reset = not restarting and not settings.keep_prefix_cache
        try:
            done = _run_on_server(settings, config, rates,
                                  replace(run_cfg, reset_prefix_cache=reset), trace, warmup,
                                  failures, restarting)
        except ServerStartError as exc:
            logger.error("configuration %s failed to start: %s", config.name, exc)
            failures.append(f"{config.name}: {str(exc).splitlines()[0]}")
            break
        runs += done.runs
        pending = pending[done.rates_used:]
        if done.no_reset and pending:
            (logger.warning if not warned[0] else logger.info)(
                "config %s: the server has no POST /reset_prefix_cache; starting a fresh "
                "server for each remaining rate so that each runs on a cold prefix cache",
                config.name)
            warned[0] = True
            restarting = True
    return runs


def run_sweep(settings: SweepSettings, run_cfg: RunConfig, trace: Trace,
              warmup: Trace | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every configuration x rate; returns the runs and the configurations that failed."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    warned = [False]  # one warning per sweep for servers without a cache reset
    for config in settings.configs:
        runs += _run_config(settings, config, run_cfg, trace, warmup, failures, warned)
    write_sweep_outputs(runs, settings.output_dir, run_cfg.percentiles, failures)
    return runs, failures


def write_sweep_outputs(runs: list[dict[str, Any]], out_dir: Path,
                        percentiles: tuple[float, ...], failures: list[str] | None = None
                        ) -> None:
    """summary.md (the side-by-side table, the step-time split, the plots' names), sweep.json
    (all runs) and the PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_sweep_plots(runs, out_dir, percentiles) if runs else []
    cache_plot = write_prefix_cache_plot(runs, out_dir) if runs else None
    if cache_plot is not None:
        plots.append(cache_plot)
    text = sweep_markdown(runs) + step_split_markdown(runs) + replicas_markdown(runs) \
        + configurations_markdown(runs)
    if plots:
        text += "\nPlots: " + ", ".join(f"`{p.name}`" for p in plots) + "\n"
    if failures:
        text += "\n" + "".join(f"- configuration failed: {f}\n" for f in failures)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "sweep.json").write_text(json.dumps(runs, indent=2))
