"""Human-readable output: one run's summary, and the side-by-side table of a sweep."""

from __future__ import annotations

from typing import Any

from loadtest.server_metrics import PHASES
from loadtest.stats import LATENCY_METRICS, percentile_label

_METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_run_summary(result: dict[str, Any], percentiles: tuple[float, ...]) -> str:
    """The console summary of one run (the layout of vLLM's serving benchmark)."""
    rows: list[tuple[str, Any]] = [
        ("Successful requests", result["completed"]),
        ("Failed requests", result["failed"]),
        ("Benchmark duration (s)", result["duration"]),
        ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", result["request_throughput"]),
    ]
    if result.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", result["request_goodput"]))
    rows += [
        ("Output token throughput (tok/s)", result["output_throughput"]),
        ("Peak output token throughput (tok/s)", result.get("max_output_tokens_per_s")),
        ("Peak concurrent requests", result.get("max_concurrent_requests")),
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
    ]
    if result.get("prefix_cache_cold") is not None:
        rows.append(("Prefix cache at the start", _cache_text(result)))
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{name:<44}{_fmt(value):>16}" for name, value in rows]
    for metric in LATENCY_METRICS:
        lines.append("{s:{c}^60}".format(s=f" {_METRIC_TITLES[metric]} ", c="-"))
        keys = [f"mean_{metric}_ms", f"median_{metric}_ms"]
        keys += [f"{percentile_label(p)}_{metric}_ms" for p in percentiles]
        for key in keys:
            label = key.split("_")[0].capitalize() + f" {metric.upper()} (ms)"
            lines.append(f"{label:<44}{_fmt(result.get(key)):>16}")
    server = result.get("server_metrics") or {}
    if server.get("available"):
        lines.append("{s:{c}^60}".format(s=" Server /metrics over the run ", c="-"))
        for key in ("server_mean_ttft_ms", "prefix_cache_hit_rate", "num_preemptions",
                    "kernel_builds"):
            lines.append(f"{key:<44}{_fmt(server.get(key), 3):>16}")
        lines += step_split_lines(server)
    for err in result.get("error_samples", []):
        lines.append(f"error x{err['count']}: {err['error'][:200]}")
    lines.append("=" * 60)
    return "\n".join(lines)


_SPLIT_HEADER = ("phase", "steps", "step ms", "attn ms", "other ms", "attn %")


def _split_cells(split: dict[str, Any] | None) -> list[str]:
    """steps, mean step/attention/other ms and attention %; '-' where the phase had no step
    (or the server did not measure it)."""
    split = split or {}
    steps = split.get("steps")
    if not steps:
        return ["-"] * 5
    share = split.get("attention_share")
    return [str(steps), _fmt(split.get("mean_step_ms")), _fmt(split.get("mean_attention_ms")),
            _fmt(split.get("mean_non_attention_ms")),
            _fmt(None if share is None else 100.0 * share, 1)]


def _split_rows(server: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """One row per phase (the three known ones first, always) and one for all steps."""
    by_phase = server.get("step_time_by_phase") or {}
    phases = list(PHASES) + [p for p in by_phase if p not in PHASES]
    rows = [(phase, _split_cells(by_phase.get(phase))) for phase in phases]
    return rows + [("all", _split_cells(server.get("step_time_all")))]


def step_split_lines(server: dict[str, Any]) -> list[str]:
    """The console table of a run's mean step time split into attention and the rest."""
    if not server.get("step_time_by_phase"):
        return []
    lines = ["{s:{c}^60}".format(s=" Engine step: attention and the rest (server) ", c="-"),
             f"{_SPLIT_HEADER[0]:<10}" + "".join(f"{h:>10}" for h in _SPLIT_HEADER[1:])]
    for phase, cells in _split_rows(server):
        lines.append(f"{phase:<10}" + "".join(f"{c:>10}" for c in cells))
    if server.get("attention_by_kind"):
        lines.append(f"attention by kind, ms/step: {_kinds_text(server['attention_by_kind'])}")
    return lines


def _per_phase(run: dict[str, Any], field: str, scale: float, digits: int) -> str:
    """'p/d/m' of one field of the step split: prefill/decode/mixed, '-' for a phase that
    did not occur."""
    by_phase = _server_value(run, "step_time_by_phase") or {}
    cells = []
    for phase in PHASES:
        split = by_phase.get(phase) or {}
        value = split.get(field) if split.get("steps") else None
        cells.append(_fmt(None if value is None else value * scale, digits))
    return "/".join(cells)


SWEEP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("completed", "ok"),
    ("failed", "failed"),
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("mean_ttft_ms", "TTFT mean ms"),
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("mean_tpot_ms", "TPOT mean ms"),
    ("median_itl_ms", "ITL p50 ms"),
    ("p99_itl_ms", "ITL p99 ms"),
    ("mean_e2el_ms", "E2E mean ms"),
    ("request_goodput", "goodput req/s"),
)


def _cache_text(run: dict[str, Any]) -> str:
    """'cold (reset)', 'cold (fresh server)', 'warm' or '-' (not known)."""
    cold = run.get("prefix_cache_cold")
    if cold is None:
        return "-"
    if not cold:
        return "warm"
    by = run.get("prefix_cache_cold_by")
    return f"cold ({by})" if by else "cold"


def _server_value(result: dict[str, Any], key: str) -> Any:
    return (result.get("server_metrics") or {}).get(key)


def sweep_markdown(runs: list[dict[str, Any]]) -> str:
    """One row per (configuration, rate), the same columns for all: a side-by-side table."""
    header = ["config", "rate"] + [title for _, title in SWEEP_COLUMNS]
    header += ["attn % all", "attn % p/d/m", "attn ms p/d/m", "step ms p/d/m", "prefix hit",
               "preempt", "kernel builds", "prefix cache"]
    with_kinds = any(_server_value(run, "attention_by_kind") for run in runs)
    if with_kinds:
        header.append("attn ms/step by kind")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [str(run.get("config_name", "-")), _fmt(run.get("request_rate"))]
        cells += [_fmt(run.get(key)) for key, _ in SWEEP_COLUMNS]
        share = _server_value(run, "attention_share_of_step_time")
        cells += [_fmt(None if share is None else 100.0 * share, 1),
                  _per_phase(run, "attention_share", 100.0, 1),
                  _per_phase(run, "mean_attention_ms", 1.0, 2),
                  _per_phase(run, "mean_step_ms", 1.0, 2),
                  _fmt(_server_value(run, "prefix_cache_hit_rate"), 3),
                  _fmt(_server_value(run, "num_preemptions"), 0),
                  _fmt(_server_value(run, "kernel_builds"), 0),
                  _cache_text(run)]
        if with_kinds:
            cells.append(_kinds_text(_server_value(run, "attention_by_kind") or {}))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _kinds_text(by_kind: dict[str, dict[str, Any]]) -> str:
    """'linear 3.10 (88%), softmax 0.42 (12%)': mean ms per step and share of attention."""
    if not by_kind:
        return "-"
    parts = []
    for kind, v in by_kind.items():
        share = v.get("share_of_attention")
        parts.append(f"{kind} {_fmt(v.get('mean_ms'), 2)} "
                     f"({_fmt(None if share is None else 100.0 * share, 0)}%)")
    return ", ".join(parts)


def step_split_markdown(runs: list[dict[str, Any]]) -> str:
    """Per run and phase: steps, mean step, attention and other ms, attention % (the data of
    the stacked plot); empty when no run has the server's step metrics."""
    if not any(_server_value(run, "step_time_by_phase") for run in runs):
        return ""
    header = ["config", "rate", *_SPLIT_HEADER]
    lines = ["", "Mean engine step time split into attention and the rest, from the server's "
             "/metrics over each run (`-`: no step of that phase):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        server = run.get("server_metrics") or {}
        if not server.get("step_time_by_phase"):
            continue
        for phase, cells in _split_rows(server):
            row = [str(run.get("config_name", "-")), _fmt(run.get("request_rate")), phase, *cells]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def replicas_markdown(runs: list[dict[str, Any]]) -> str:
    """Behind a router: per run, each worker's share of the requests and its hit rate."""
    rows = []
    for run in runs:
        for name, rep in sorted((_server_value(run, "replicas") or {}).items()):
            rows.append([str(run.get("config_name", "-")), _fmt(run.get("request_rate")), name,
                         _fmt(rep.get("requests"), 0), _fmt(rep.get("prompt_tokens"), 0),
                         _fmt(rep.get("prefix_cache_hit_rate"), 3)])
    if not rows:
        return ""
    header = ["config", "rate", "replica", "requests", "prompt tokens", "prefix hit"]
    lines = ["", "Per replica, from each worker's own /metrics over the run:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def configurations_markdown(runs: list[dict[str, Any]]) -> str:
    """Each configuration's server flags, once, under the table."""
    seen: dict[str, list[str]] = {}
    for run in runs:
        launch = run.get("server_launch") or {}
        seen.setdefault(str(run.get("config_name", "-")), list(launch.get("args", [])))
    if not seen:
        return ""
    lines = ["", "| config | server flags |", "|---|---|"]
    lines += [f"| {name} | `{' '.join(args)}` |" for name, args in seen.items()]
    return "\n".join(lines) + "\n"
