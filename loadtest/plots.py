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
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from loadtest.server_metrics import PHASES  # noqa: E402
from loadtest.stats import percentile_label  # noqa: E402

STEP_SPLIT_PNG = "step_time_split.png"


INF_LABEL = "inf\n(all at once)"
# One line style and marker per percentile, in the order they are drawn (median first).
PERCENTILE_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"))


def _is_inf(rate: Any) -> bool:
    return rate == "inf" or (isinstance(rate, float) and math.isinf(rate))


def rate_categories(runs: list[dict[str, Any]]) -> list[str]:
    """The x categories of the rate plots: the finite rates in increasing order, then 'inf'
    (everything sent at once) as a category of its own, not a number."""
    finite = sorted({float(r["request_rate"]) for r in runs if not _is_inf(r.get("request_rate"))})
    labels = [f"{rate:g}" for rate in finite]
    if any(_is_inf(r.get("request_rate")) for r in runs):
        labels.append("inf")
    return labels


def _by_config(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[str(run.get("config_name", "run"))].append(run)
    return dict(sorted(grouped.items()))


def _context_line(runs: list[dict[str, Any]]) -> str:
    """'model M; workload random, 100 prompts, in 512, out 128' for a plot's title."""
    models = sorted({str(r.get("model_id")) for r in runs if r.get("model_id")})
    workloads = sorted({_workload_text(r) for r in runs})
    return f"model {', '.join(models) or '?'}; workload {' | '.join(workloads)}"


def _percentile_keys(metric: str, percentiles: tuple[float, ...]) -> list[tuple[str, str]]:
    keys = [("median", f"median_{metric}_ms")]
    keys += [(percentile_label(p), f"{percentile_label(p)}_{metric}_ms") for p in percentiles
             if p != 50]
    return keys


def latency_vs_rate_figure(runs: list[dict[str, Any]], metric: str,
                           percentiles: tuple[float, ...]) -> Figure:
    """Latency percentiles against the request rate. Colour: the configuration (or the
    percentile, when there is one configuration); line style and marker: the percentile.
    The 'inf' rate is a separate category right of a dotted line, not joined to the rest."""
    categories = rate_categories(runs)
    position = {label: i for i, label in enumerate(categories)}
    configs = _by_config(runs)
    keys = _percentile_keys(metric, percentiles)
    one_config = len(configs) == 1
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for color_index, (name, group) in enumerate(configs.items()):
        by_rate = {_rate_text(r.get("request_rate")): r for r in group}
        for style_index, (label, key) in enumerate(keys):
            linestyle, marker = PERCENTILE_STYLES[style_index % len(PERCENTILE_STYLES)]
            color = f"C{style_index if one_config else color_index}"
            finite = [c for c in categories if c != "inf" and c in by_rate]
            xs = [position[c] for c in finite]
            ys = [by_rate[c].get(key) for c in finite]
            inf_y = by_rate["inf"].get(key) if "inf" in by_rate else None
            if all(y is None for y in ys) and inf_y is None:
                continue
            ax.plot(xs, [math.nan if y is None else y for y in ys], linestyle=linestyle,
                    marker=marker, color=color, label=f"{name} {label}")
            if inf_y is not None:
                ax.plot([position["inf"]], [inf_y], linestyle="none", marker=marker,
                        color=color, markersize=8)
    ax.set_xticks(range(len(categories)),
                  [INF_LABEL if c == "inf" else c for c in categories])
    if "inf" in position and len(categories) > 1:
        ax.axvline(position["inf"] - 0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_xlabel("request rate (req/s; one column each)")
    ax.set_ylabel(f"{metric.upper()} (ms)")
    ax.set_title(f"{metric.upper()} percentiles against request rate\n{_context_line(runs)}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    # Legends right of the plot, where they cover no point.
    if one_config:
        ax.legend([Line2D([], [], color=f"C{i}", linestyle=ls, marker=mk)
                   for i, (ls, mk) in enumerate(_styles(len(keys)))],
                  [label for label, _ in keys], fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), title=f"{next(iter(configs))}\npercentile",
                  title_fontsize=8)
    else:
        _two_legends(ax, list(configs), [label for label, _ in keys])
    fig.tight_layout()
    return fig


def _styles(n: int) -> list[tuple[Any, str]]:
    return [PERCENTILE_STYLES[i % len(PERCENTILE_STYLES)] for i in range(n)]


def _two_legends(ax: Axes, configs: list[str], percentile_names: list[str]) -> None:
    """One legend for the configurations (colours), one for the percentiles (styles)."""
    config_handles = [Line2D([], [], color=f"C{i}", linewidth=3) for i in range(len(configs))]
    style_handles = [Line2D([], [], color="0.2", linestyle=ls, marker=mk)
                     for ls, mk in _styles(len(percentile_names))]
    first = ax.legend(config_handles, configs, fontsize=8, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), title="configuration", title_fontsize=8)
    ax.add_artist(first)
    ax.legend(style_handles, percentile_names, fontsize=8, loc="lower left",
              bbox_to_anchor=(1.01, 0.0), title="percentile", title_fontsize=8)


def _latency_vs_rate(runs: list[dict[str, Any]], metric: str, percentiles: tuple[float, ...],
                     path: Path) -> None:
    fig = latency_vs_rate_figure(runs, metric, percentiles)
    # The legends stand right of the axes: the saved area is grown to hold them.
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)]
    fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)


def throughput_vs_latency_figure(runs: list[dict[str, Any]]) -> Figure:
    """Median TPOT and TTFT against output throughput, one point per run, each point
    labelled with its request rate."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for color_index, (name, group) in enumerate(_by_config(runs).items()):
        group = sorted(group, key=lambda r: r.get("output_throughput") or 0.0)
        xs = [r.get("output_throughput") for r in group]
        for ax, key in zip(axes, ("median_tpot_ms", "median_ttft_ms"), strict=True):
            ys = [r.get(key) for r in group]
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o",
                    color=f"C{color_index}", label=name)
            for x, y, run in zip(xs, ys, group, strict=True):
                if x is None or y is None:
                    continue
                rate = _rate_text(run.get("request_rate"))
                ax.annotate(rate if rate == "inf" else f"{rate}/s", (x, y),
                            textcoords="offset points", xytext=(5, 5), fontsize=8,
                            color=f"C{color_index}")
    for ax, title in zip(axes, ("median TPOT (ms)", "median TTFT (ms)"), strict=True):
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, title="configuration", title_fontsize=8)
        ax.margins(x=0.12, y=0.12)  # room for the rate labels
    fig.suptitle("Throughput against latency, one point per request rate (its label: req/s; "
                 f"inf = all at once)\n{_context_line(runs)}", fontsize=10)
    fig.tight_layout()
    return fig


def _throughput_vs_latency(runs: list[dict[str, Any]], path: Path) -> None:
    fig = throughput_vs_latency_figure(runs)
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
    return "inf" if _is_inf(rate) else f"{float(rate):g}"


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
                      ("output_len", "out"), ("shared_prefix_order", "order")):
        if run.get(key) is not None:
            parts.append(f"{run[key]} {name}" if key in ("num_prompts", "num_groups", "turns")
                         else f"{name} {run[key]}")
    return ", ".join(parts)


def _step_split_title(runs: list[dict[str, Any]]) -> str:
    rates = sorted({_rate_text(r.get("request_rate")) for r in runs})
    line = _context_line(runs)
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
