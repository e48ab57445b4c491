"""PNG plots of a sweep: latency percentiles against request rate, throughput against latency."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.stats import percentile_label  # noqa: E402


def _rate_value(run: dict[str, Any], finite_max: float) -> float:
    """Rates on the x axis; 'inf' is drawn one step past the largest finite rate."""
    rate = run.get("request_rate")
    if rate == "inf" or (isinstance(rate, float) and math.isinf(rate)):
        return finite_max * 2 if finite_max > 0 else 1.0
    return float(rate)


def _by_config(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[str(run.get("config_name", "run"))].append(run)
    return grouped


def _latency_vs_rate(runs: list[dict[str, Any]], metric: str, percentiles: tuple[float, ...],
                     path: Path) -> None:
    finite = [float(r["request_rate"]) for r in runs if r.get("request_rate") != "inf"]
    finite_max = max(finite, default=0.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    keys = [("median", f"median_{metric}_ms")] + [
        (percentile_label(p), f"{percentile_label(p)}_{metric}_ms") for p in percentiles]
    for color_index, (name, group) in enumerate(sorted(_by_config(runs).items())):
        group = sorted(group, key=lambda r: _rate_value(r, finite_max))
        xs = [_rate_value(r, finite_max) for r in group]
        for style_index, (label, key) in enumerate(keys):
            ys = [r.get(key) for r in group]
            if all(y is None for y in ys):
                continue
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o",
                    linestyle=styles[style_index % len(styles)], color=f"C{color_index}",
                    label=f"{name} {label}")
    ax.set_xlabel("request rate (req/s; inf drawn at 2x the largest)")
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(f"{metric.upper()} percentiles against request rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_vs_latency(runs: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for color_index, (name, group) in enumerate(sorted(_by_config(runs).items())):
        group = sorted(group, key=lambda r: r.get("output_throughput") or 0.0)
        xs = [r.get("output_throughput") for r in group]
        for ax, key in zip(axes, ("median_tpot_ms", "median_ttft_ms"), strict=True):
            ys = [r.get(key) for r in group]
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o",
                    color=f"C{color_index}", label=name)
    for ax, title in zip(axes, ("median TPOT (ms)", "median TTFT (ms)"), strict=True):
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("throughput against latency, one point per request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_plots(runs: list[dict[str, Any]], out_dir: Path,
                      percentiles: tuple[float, ...]) -> list[Path]:
    """ttft_vs_rate.png, itl_vs_rate.png, throughput_vs_latency.png; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "ttft_vs_rate.png", out_dir / "itl_vs_rate.png",
             out_dir / "throughput_vs_latency.png"]
    _latency_vs_rate(runs, "ttft", percentiles, paths[0])
    _latency_vs_rate(runs, "itl", percentiles, paths[1])
    _throughput_vs_latency(runs, paths[2])
    return paths
