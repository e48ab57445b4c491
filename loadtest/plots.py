"""PNG plots of a sweep: latency percentiles against request rate, throughput against latency,
and the engine's mean step time split into attention and the rest, by phase."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.server_metrics import PHASES  # noqa: E402
from loadtest.stats import percentile_label  # noqa: E402

STEP_SPLIT_PNG = "step_time_split.png"


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


@dataclass
class StepSplitBar:
    """One bar of the stacked plot: a run's mean step of one phase (None: no such step)."""

    config: str
    rate: str | None  # None when every run of the sweep has the same rate
    phase: str
    attention_ms: float | None
    other_ms: float | None

    @property
    def label(self) -> str:
        return self.config if self.rate is None else f"{self.config} @ {self.rate} req/s"


def _rate_text(rate: Any) -> str:
    return "inf" if rate == "inf" else f"{float(rate):g}"


def step_split_bars(runs: list[dict[str, Any]]) -> list[StepSplitBar]:
    """The bars of the stacked plot, one per run and phase, in run order. A bar is labelled
    with its configuration, and with the request rate when the runs have several rates."""
    several_rates = len({_rate_text(r.get("request_rate")) for r in runs}) > 1
    bars = []
    for run in runs:
        rate = _rate_text(run.get("request_rate")) if several_rates else None
        by_phase = (run.get("server_metrics") or {}).get("step_time_by_phase") or {}
        for phase in PHASES:
            split = by_phase.get(phase) or {}
            attention, other = split.get("mean_attention_ms"), split.get("mean_non_attention_ms")
            if not split.get("steps") or attention is None or other is None:
                attention = other = None
            bars.append(StepSplitBar(str(run.get("config_name", "run")), rate, phase,
                                     attention, other))
    return bars


def _workload_text(run: dict[str, Any]) -> str:
    """'random, 100 prompts, in 512, out 128' from the keys the run's workload describes."""
    parts = [str(run.get("workload", "?"))]
    for key, name in (("num_prompts", "prompts"), ("num_groups", "groups"),
                      ("prompts_per_group", "per group"), ("system_prompt_len", "system"),
                      ("question_len", "question"), ("turns", "turns"), ("input_len", "in"),
                      ("output_len", "out")):
        if run.get(key) is not None:
            parts.append(f"{run[key]} {name}" if key in ("num_prompts", "num_groups", "turns")
                         else f"{name} {run[key]}")
    return ", ".join(parts)


def _step_split_title(runs: list[dict[str, Any]]) -> str:
    models = sorted({str(r.get("model_id")) for r in runs if r.get("model_id")})
    workloads = sorted({_workload_text(r) for r in runs})
    rates = sorted({_rate_text(r.get("request_rate")) for r in runs})
    line = f"model {', '.join(models) or '?'}; workload {' | '.join(workloads)}"
    if len(rates) == 1:
        line += f"; {rates[0]} req/s"
    return f"Mean engine step time: attention and the rest, by phase\n{line}"


def _step_split_plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """One panel per phase (each its own ms scale: a prefill step can be many decode steps);
    in each, one stacked bar per run. False (nothing written) when no run has the data."""
    bars = step_split_bars(runs)
    if all(b.attention_ms is None for b in bars):
        return False
    per_phase = len(bars) // len(PHASES)
    fig, axes = plt.subplots(1, len(PHASES), squeeze=False,
                             figsize=(min(30.0, 3 * (1.5 + 0.5 * per_phase)), 5.5))
    for ax, phase in zip(axes[0], PHASES, strict=True):
        mine = [b for b in bars if b.phase == phase]
        # A gap between configurations: their rates' bars stand together.
        configs = list(dict.fromkeys(b.config for b in mine))
        xs = [i + 0.6 * configs.index(b.config) for i, b in enumerate(mine)]
        attention = [b.attention_ms or 0.0 for b in mine]
        other = [b.other_ms or 0.0 for b in mine]
        ax.bar(xs, attention, color="C3", label="attention")
        ax.bar(xs, other, bottom=attention, color="C0", alpha=0.55, label="rest of the step")
        top = max((a + o for a, o in zip(attention, other, strict=True)), default=0.0) or 1.0
        for x, bar in zip(xs, mine, strict=True):
            if bar.attention_ms is None:
                ax.text(x, 0.02 * top, "no steps", ha="center", va="bottom", rotation=90,
                        fontsize=8, color="0.4")
            else:
                total = bar.attention_ms + (bar.other_ms or 0.0)
                share = 100.0 * bar.attention_ms / total if total > 0 else 0.0
                ax.text(x, total, f"{share:.0f}%", ha="center", va="bottom", fontsize=8)
        # Few short names stand upright, a line each for configuration and rate; others slant.
        upright = [b.label.replace(" @ ", "\n") for b in mine]
        if len(mine) <= 4 and all(len(line) <= 12 for u in upright for line in u.split("\n")):
            ax.set_xticks(xs, upright, fontsize=8)
        else:
            ax.set_xticks(xs, [b.label for b in mine], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(f"{phase} steps")
        ax.set_ylabel("mean step time (ms)")
        ax.grid(True, axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, [f"{n} (the % on a bar: attention's share)" if n == "attention" else n
                         for n in names], loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(_step_split_title(runs), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_sweep_plots(runs: list[dict[str, Any]], out_dir: Path,
                      percentiles: tuple[float, ...]) -> list[Path]:
    """ttft_vs_rate.png, itl_vs_rate.png, throughput_vs_latency.png and, when the server
    exported its step metrics, step_time_split.png; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "ttft_vs_rate.png", out_dir / "itl_vs_rate.png",
             out_dir / "throughput_vs_latency.png"]
    _latency_vs_rate(runs, "ttft", percentiles, paths[0])
    _latency_vs_rate(runs, "itl", percentiles, paths[1])
    _throughput_vs_latency(runs, paths[2])
    if _step_split_plot(runs, out_dir / STEP_SPLIT_PNG):
        paths.append(out_dir / STEP_SPLIT_PNG)
    return paths
