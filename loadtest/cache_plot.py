"""The prefix-cache plot of a sweep: hit rate, median TTFT and output throughput side by
side, one bar per configuration at each rate (e.g. a router's routing policies on the same
trace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from loadtest.plots import _by_config, _context_line, _rate_text, rate_categories  # noqa: E402

PREFIX_CACHE_PNG = "prefix_cache_vs_config.png"
# (key, title, read from the server's metrics, bar label format)
PANELS = (("prefix_cache_hit_rate", "prefix-cache hit rate (server)", True, "%.2f"),
          ("median_ttft_ms", "median TTFT (ms)", False, "%.0f"),
          ("output_throughput", "output throughput (tok/s)", False, "%.3g"))


def _value(run: dict[str, Any], key: str, from_server: bool) -> float | None:
    source = (run.get("server_metrics") or {}) if from_server else run
    value = source.get(key)
    return None if value is None else float(value)


def prefix_cache_figure(runs: list[dict[str, Any]]) -> Figure:
    categories = rate_categories(runs)
    groups = _by_config(runs)
    width = 0.8 / max(1, len(groups))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.5))
    for ax, (key, title, from_server, label_format) in zip(axes, PANELS, strict=True):
        for i, (name, group) in enumerate(groups.items()):
            by_rate = {_rate_text(r.get("request_rate")): r for r in group}
            xs, ys = [], []
            for j, category in enumerate(categories):
                run = by_rate.get(category)
                value = None if run is None else _value(run, key, from_server)
                if value is not None:
                    xs.append(j + (i - (len(groups) - 1) / 2) * width)
                    ys.append(value)
            bars = ax.bar(xs, ys, width=width, color=f"C{i}", label=name)
            ax.bar_label(bars, fmt=label_format, fontsize=7)
        ax.set_xticks(range(len(categories)), ["all at once" if c == "inf" else f"{c}/s"
                                               for c in categories], fontsize=8)
        ax.set_xlabel("request rate")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.12)  # room for the bar labels
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8,
               title="configuration", title_fontsize=8)
    fig.suptitle(f"Prefix cache, TTFT and throughput per configuration\n{_context_line(runs)}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def write_prefix_cache_plot(runs: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """The plot, when the servers reported a prefix-cache hit rate; else None."""
    if not any(_value(r, "prefix_cache_hit_rate", True) is not None for r in runs):
        return None
    fig = prefix_cache_figure(runs)
    path = out_dir / PREFIX_CACHE_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
