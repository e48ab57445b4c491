"""Human-readable output: one run's summary, and the side-by-side table of a sweep."""

from __future__ import annotations

from typing import Any

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
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
    ]
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
        for key in ("server_mean_ttft_ms", "attention_share_of_step_time",
                    "prefix_cache_hit_rate", "num_preemptions", "kernel_builds"):
            lines.append(f"{key:<44}{_fmt(server.get(key), 3):>16}")
    for err in result.get("error_samples", []):
        lines.append(f"error x{err['count']}: {err['error'][:200]}")
    lines.append("=" * 60)
    return "\n".join(lines)


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


def _server_value(result: dict[str, Any], key: str) -> Any:
    return (result.get("server_metrics") or {}).get(key)


def sweep_markdown(runs: list[dict[str, Any]]) -> str:
    """One row per (configuration, rate), the same columns for all: a side-by-side table."""
    header = ["config", "rate"] + [title for _, title in SWEEP_COLUMNS]
    header += ["attn share", "prefix hit", "preempt", "kernel builds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [str(run.get("config_name", "-")), _fmt(run.get("request_rate"))]
        cells += [_fmt(run.get(key)) for key, _ in SWEEP_COLUMNS]
        cells += [_fmt(_server_value(run, "attention_share_of_step_time"), 3),
                  _fmt(_server_value(run, "prefix_cache_hit_rate"), 3),
                  _fmt(_server_value(run, "num_preemptions"), 0),
                  _fmt(_server_value(run, "kernel_builds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
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
