"""The sweep plots read at a glance: 'inf' is its own labelled category, each percentile
has its own style (and colour, for one configuration), throughput-latency points carry
their rate, titles name the model and the workload."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.colors import to_hex
from matplotlib.text import Annotation

from loadtest.plots import (
    INF_LABEL,
    latency_vs_rate_figure,
    rate_categories,
    throughput_vs_latency_figure,
)

PERCENTILES = (90.0, 99.0)


def _runs(configs: tuple[str, ...], rates: tuple[Any, ...]) -> list[dict[str, Any]]:
    runs = []
    for c, name in enumerate(configs):
        for i, rate in enumerate(rates):
            run = {"config_name": name, "request_rate": rate, "model_id": "llama3-8b",
                   "workload": "random", "num_prompts": 200, "input_len": 512,
                   "output_len": 128, "output_throughput": 100.0 * (i + 1) + c}
            for key, base in (("median", 10.0), ("p90", 20.0), ("p99", 30.0)):
                run[f"{key}_ttft_ms"] = base + i + c
                run[f"{key}_tpot_ms"] = base / 2 + i
            runs.append(run)
    return runs


def test_rates_are_categories_with_inf_last() -> None:
    runs = _runs(("a",), ("inf", 8.0, 0.5, 2.0))
    assert rate_categories(runs) == ["0.5", "2", "8", "inf"]
    assert rate_categories(_runs(("a",), (4.0, 1.0))) == ["1", "4"]


def test_latency_plot_draws_inf_apart_and_each_percentile_in_its_own_style() -> None:
    runs = _runs(("sdpa", "triton"), (1.0, 2.0, 4.0, "inf"))
    fig = latency_vs_rate_figure(runs, "ttft", PERCENTILES)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", INF_LABEL]
    inf_x = 3
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 0]
    joined = [line for line in lines if line.get_linestyle() != "None"
              and len(set(line.get_xdata())) > 1]
    points = [line for line in lines if line.get_linestyle() == "None"]
    # No line runs into the inf column: its points stand alone, past a dotted separator.
    assert len(joined) == 2 * 3 and all(max(line.get_xdata()) < inf_x for line in joined)
    assert len(points) == 2 * 3 and all(list(line.get_xdata()) == [inf_x] for line in points)
    separators = [line for line in lines if list(line.get_xdata()) == [inf_x - 0.5] * 2]
    assert len(separators) == 1 and separators[0].get_linestyle() == ":"
    # Colour: the configuration; style and marker: the percentile, one each.
    by_label = {line.get_label(): line for line in joined}
    styles = {(by_label[f"sdpa {p}"].get_linestyle(), by_label[f"sdpa {p}"].get_marker())
              for p in ("median", "p90", "p99")}
    assert len(styles) == 3
    assert to_hex(by_label["sdpa p90"].get_color()) == to_hex(by_label["sdpa p99"].get_color())
    assert to_hex(by_label["sdpa p90"].get_color()) != to_hex(by_label["triton p90"].get_color())
    assert by_label["triton p99"].get_ydata()[2] == 30.0 + 2 + 1
    title = ax.get_title()
    assert "llama3-8b" in title and "random" in title and "in 512" in title
    plt.close(fig)


def test_one_configuration_gets_a_colour_per_percentile() -> None:
    fig = latency_vs_rate_figure(_runs(("only",), (1.0, 2.0)), "ttft", PERCENTILES)
    ax = fig.axes[0]
    colours = {to_hex(line.get_color()) for line in ax.get_lines()}
    assert len(colours) == 3  # median, p90, p99
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    assert not any(line.get_linestyle() == ":" and len(line.get_xdata()) == 2
                   and line.get_xdata()[0] == line.get_xdata()[1] for line in ax.get_lines())
    plt.close(fig)


def test_throughput_points_are_labelled_with_their_rate() -> None:
    runs = _runs(("sdpa", "triton"), (1.0, 4.0, "inf"))
    fig = throughput_vs_latency_figure(runs)
    for ax in fig.axes:
        labels = sorted(child.get_text() for child in ax.get_children()
                        if isinstance(child, Annotation))
        assert labels == sorted(["1/s", "4/s", "inf"] * 2)
    inf_label = next(child for child in fig.axes[0].get_children()
                     if isinstance(child, Annotation) and child.get_text() == "inf")
    assert inf_label.xy == (300.0, 7.0)  # the sdpa run at inf: throughput 300, TPOT 5 + 2
    title = fig.get_suptitle()
    assert "llama3-8b" in title and "random" in title
    plt.close(fig)
