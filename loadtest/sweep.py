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

from loadtest.plots import write_sweep_plots
from loadtest.report import configurations_markdown, step_split_markdown, sweep_markdown
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
    restart_per_rate: bool = False


def _run_on_server(settings: SweepSettings, config: ServerConfig, rates: list[float],
                   run_cfg: RunConfig, trace: Trace, warmup: Trace | None,
                   served_before: int, failures: list[str]) -> list[dict[str, Any]]:
    args = [*settings.common_args, *config.args]
    suffix = f"_rate-{_rate_slug(rates[0])}" if settings.restart_per_rate else ""
    log = settings.output_dir / f"server_{_slug(config.name)}{suffix}.log"
    results = []
    with ServerProcess(args, log, settings.host, settings.server_command,
                       settings.startup_timeout_s) as server:
        for position, rate in enumerate(rates):
            cfg = replace(run_cfg, base_url=server.base_url, request_rate=rate)
            logger.info("config %s, rate %s", config.name, _rate_slug(rate))
            try:
                result = asyncio.run(run_benchmark(cfg, trace, warmup))
            except RuntimeError as exc:  # e.g. every warm-up request failed
                failures.append(f"{config.name} at rate {_rate_slug(rate)}: {exc}")
                continue
            result["config_name"] = config.name
            result["server_launch"] = {"command": server.full_command(), "args": args,
                                       "runs_served_before": served_before + position}
            path = settings.output_dir / f"{_slug(config.name)}_rate-{_rate_slug(rate)}.json"
            path.write_text(json.dumps(result, indent=2))
            results.append(result)
    return results


def run_sweep(settings: SweepSettings, run_cfg: RunConfig, trace: Trace,
              warmup: Trace | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every configuration x rate; returns the runs and the configurations that failed."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for config in settings.configs:
        groups = [[r] for r in settings.rates] if settings.restart_per_rate else [settings.rates]
        served = 0
        for rates in groups:
            try:
                runs += _run_on_server(settings, config, rates, run_cfg, trace, warmup,
                                       0 if settings.restart_per_rate else served, failures)
            except ServerStartError as exc:
                logger.error("configuration %s failed to start: %s", config.name, exc)
                failures.append(f"{config.name}: {str(exc).splitlines()[0]}")
                break
            served += len(rates)
    write_sweep_outputs(runs, settings.output_dir, run_cfg.percentiles, failures)
    return runs, failures


def write_sweep_outputs(runs: list[dict[str, Any]], out_dir: Path,
                        percentiles: tuple[float, ...], failures: list[str] | None = None
                        ) -> None:
    """summary.md (the side-by-side table, the step-time split, the plots' names), sweep.json
    (all runs) and the PNG plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_sweep_plots(runs, out_dir, percentiles) if runs else []
    text = sweep_markdown(runs) + step_split_markdown(runs) + configurations_markdown(runs)
    if plots:
        text += "\nPlots: " + ", ".join(f"`{p.name}`" for p in plots) + "\n"
    if failures:
        text += "\n" + "".join(f"- configuration failed: {f}\n" for f in failures)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "sweep.json").write_text(json.dumps(runs, indent=2))
