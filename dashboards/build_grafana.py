"""Writes dashboards/grafana.json, the Grafana dashboard for attnserve's /metrics.

The JSON is generated so that every panel follows the same conventions (label selector,
grouping and legends by SERIES_LABELS, $__rate_interval windows); edit this file and
run `python dashboards/build_grafana.py` rather than editing the JSON by hand. A test
checks that the committed JSON is what this script produces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("grafana.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The dashboard's variables filter every query; "All" means the regex .*
# ($replica's "All" also matches a server without the label: =~".*" matches the empty value.)
SEL = ('model_name=~"$model_name",attention_backend=~"$attention_backend",'
       'kv_layout=~"$kv_layout",replica=~"$replica"')
# The labels that tell two servers apart: every query groups by them and every legend shows
# them, so two configurations (or two replicas behind a router, `--replica-name`) never
# merge into one line. A new engine label (e.g. kv_cache_dtype) is one more entry here.
SERIES_LABELS = ("model_name", "attention_backend", "kv_layout", "page_size",
                 "attention_variant", "kv_cache_dtype", "tp_size", "replica")
# The pool of replicas as one: the same labels without `replica` (the "Replicas" panels).
POOL_LABELS = tuple(label for label in SERIES_LABELS if label != "replica")
POOL_BY = ", ".join(POOL_LABELS)
POOL_LEGEND = " ".join(f"{'p' if name == 'page_size' else ''}{{{{{name}}}}}"
                       for name in POOL_LABELS)
_LEGEND_PREFIX = {"page_size": "p"}  # "p16" reads better than a bare 16
BY = ", ".join(SERIES_LABELS)
LEGEND = " ".join(f"{_LEGEND_PREFIX.get(name, '')}{{{{{name}}}}}" for name in SERIES_LABELS)
RATE = "[$__rate_interval]"
PHASE_LEGEND = f"{LEGEND} {{{{phase}}}}"
# Panels of the step-time split (tests evaluate their expressions against a real Prometheus).
ATTENTION_SHARE_PANEL = "Attention share of step time"
ATTENTION_MS_PANEL = "Attention time per step"
NON_ATTENTION_MS_PANEL = "Non-attention time per step"
STEP_SPLIT_PANELS = (ATTENTION_SHARE_PANEL, ATTENTION_MS_PANEL, NON_ATTENTION_MS_PANEL)
# Panels that sum over the replicas (grouped by POOL_LABELS, not SERIES_LABELS).
POOL_HIT_RATE_PANEL = "Replicas: prefix cache hit rate of the pool"
POOL_PANELS = (POOL_HIT_RATE_PANEL,)


@dataclass
class Target:
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str
    width: int = 12


def quantiles(metric: str, by: str = BY, legend: str = LEGEND,
              qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[Target]:
    return [
        Target(f"histogram_quantile({q}, sum by (le, {by}) "
               f"(rate(attnserve_{metric}_bucket{{{SEL}}}{RATE})))", f"{legend} p{round(q * 100)}")
        for q in qs
    ]


def mean(metric: str, by: str = BY, legend: str = LEGEND) -> Target:
    return Target(f"sum by ({by}) (rate(attnserve_{metric}_sum{{{SEL}}}{RATE})) / "
                  f"sum by ({by}) (rate(attnserve_{metric}_count{{{SEL}}}{RATE}))", legend)


def _rate_sum(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate(attnserve_{metric}{{{SEL}}}{RATE}))"


def step_split_panels() -> list[Panel]:
    """Attention and step time are observed on every step, by phase, so over any window
    share = rate(attention sum) / rate(step sum) and ms per step = rate(sum) / rate(count)."""
    by_phase = f"{BY}, phase"
    attention, step = "attention_duration_seconds_sum", "step_duration_seconds_sum"
    steps = _rate_sum("step_duration_seconds_count", by_phase)
    return [
        Panel(ATTENTION_SHARE_PANEL, "Time inside the attention backend over the engine step "
              "time, by phase and over all steps: the part of a step a better kernel or "
              "layout can shrink.", [
            Target(f"{_rate_sum(attention, by_phase)} / {_rate_sum(step, by_phase)}",
                   PHASE_LEGEND),
            Target(f"{_rate_sum(attention, BY)} / {_rate_sum(step, BY)}", f"{LEGEND} all"),
        ], "percentunit"),
        Panel(ATTENTION_MS_PANEL, "Mean time inside the attention backend per engine step, "
              "by phase (milliseconds).", [
            Target(f"1000 * {_rate_sum(attention, by_phase)} / {steps}", PHASE_LEGEND),
        ], "ms"),
        Panel(NON_ATTENTION_MS_PANEL, "Mean step time outside the attention backend per "
              "engine step, by phase (milliseconds): weights, norms, sampling, host work.", [
            Target(f"1000 * ({_rate_sum(step, by_phase)} - {_rate_sum(attention, by_phase)})"
                   f" / {steps}", PHASE_LEGEND),
        ], "ms"),
    ]


def replica_panels() -> list[Panel]:
    """Replicas behind a router side by side (each one's series carry its `replica` label):
    how the router spreads the requests, and what the pool's prefix cache gets from it."""
    success = "attnserve_request_success_total"
    hits, queries = "attnserve_prefix_cache_hits_total", "attnserve_prefix_cache_queries_total"
    return [
        Panel("Replicas: share of the requests", "Each replica's finished requests over all "
              "replicas' (per second, over the window): how the router spreads the load.", [
            Target(f"sum by ({BY}) (rate({success}{{{SEL}}}{RATE})) / ignoring(replica) "
                   f"group_left sum by ({POOL_BY}) (rate({success}{{{SEL}}}{RATE}))", LEGEND),
        ], "percentunit"),
        Panel(POOL_HIT_RATE_PANEL, "Prompt tokens served from the prefix cache over prompt "
              "tokens looked up, summed over the replicas: what cache-aware routing buys "
              "(compare with each replica's own rate in 'Prefix cache hit rate').", [
            Target(f"sum by ({POOL_BY}) (rate({hits}{{{SEL}}}{RATE})) / "
                   f"sum by ({POOL_BY}) (rate({queries}{{{SEL}}}{RATE}))", POOL_LEGEND),
        ], "percentunit"),
    ]


def panels() -> list[Panel]:
    return [
        Panel("Time to first token", "TTFT quantiles: arrival to first generated token.",
              quantiles("time_to_first_token_seconds"), "s"),
        Panel("Inter-token latency", "ITL quantiles: time between consecutive tokens of a "
              "request.", quantiles("inter_token_latency_seconds"), "s"),
        Panel("Time per output token", "TPOT quantiles: (e2e - TTFT) / (tokens - 1) per request.",
              quantiles("request_time_per_output_token_seconds"), "s"),
        Panel("End-to-end request latency", "E2E quantiles: arrival to last token.",
              quantiles("e2e_request_latency_seconds"), "s"),
        Panel("Token throughput", "Prompt and generated tokens per second.", [
            Target(f"sum by ({BY}) (rate(attnserve_prompt_tokens_total{{{SEL}}}{RATE}))",
                   f"{LEGEND} prompt"),
            Target(f"sum by ({BY}) (rate(attnserve_generation_tokens_total{{{SEL}}}{RATE}))",
                   f"{LEGEND} generation"),
        ], "tps"),
        Panel("Requests running and waiting", "Requests in the running batch and in the queue.", [
            Target(f"sum by ({BY}) (attnserve_num_requests_running{{{SEL}}})",
                   f"{LEGEND} running"),
            Target(f"sum by ({BY}) (attnserve_num_requests_waiting{{{SEL}}})",
                   f"{LEGEND} waiting"),
        ], "short"),
        Panel("KV cache usage", "Fraction of KV pages held by requests (evictable prefix-cache "
              "pages count as free).", [
            Target(f"max by ({BY}) (attnserve_kv_cache_usage_perc{{{SEL}}})", LEGEND),
        ], "percentunit"),
        Panel("Prefix cache hit rate", "Prompt tokens served from the prefix cache over prompt "
              "tokens looked up, from the two counters.", [
            Target(f"sum by ({BY}) (rate(attnserve_prefix_cache_hits_total{{{SEL}}}{RATE})) / "
                   f"sum by ({BY}) (rate(attnserve_prefix_cache_queries_total{{{SEL}}}{RATE}))",
                   LEGEND),
        ], "percentunit"),
        Panel("Preemptions", "Requests preempted (recomputed later) per second.", [
            Target(f"sum by ({BY}) (rate(attnserve_num_preemptions_total{{{SEL}}}{RATE}))",
                   LEGEND),
        ], "short"),
        Panel("Kernel builds while serving", "Triton kernel instances a step had to build "
              "after start-up (each stalls that step; should stay 0).", [
            Target(f"sum by ({BY}) (increase(attnserve_kernel_compiles_total{{{SEL}}}{RATE}))",
                   LEGEND),
        ], "short"),
        Panel("Finished and failed requests", "Requests per second by finish reason, and "
              "engine failures.", [
            Target(f"sum by ({BY}, finished_reason) "
                   f"(rate(attnserve_request_success_total{{{SEL}}}{RATE}))",
                   f"{LEGEND} {{{{finished_reason}}}}"),
            Target(f"sum by ({BY}, reason) (rate(attnserve_request_failure_total{{{SEL}}}{RATE}))",
                   f"{LEGEND} failed {{{{reason}}}}"),
        ], "reqps"),
        Panel("Step duration by phase", "Engine step wall time (p50, p99) per phase: prefill, "
              "decode, or mixed.",
              quantiles("step_duration_seconds", f"{BY}, phase", PHASE_LEGEND, (0.5, 0.99)),
              "s"),
        *step_split_panels(),
        Panel("Tokens per step", "Tokens computed per engine step: mean and p90.", [
            mean("iteration_tokens", legend=f"{LEGEND} mean"),
            *quantiles("iteration_tokens", qs=(0.9,)),
        ], "short"),
        *replica_panels(),
        Panel("Request time split", "Mean queue, prefill and decode time per finished request.", [
            mean("request_queue_time_seconds", legend=f"{LEGEND} queue"),
            mean("request_prefill_time_seconds", legend=f"{LEGEND} prefill"),
            mean("request_decode_time_seconds", legend=f"{LEGEND} decode"),
        ], "s"),
    ]


def _variable(name: str, depends_on: list[str]) -> dict[str, Any]:
    matcher = ",".join(f'{d}=~"${d}"' for d in depends_on)
    series = "attnserve_num_requests_running" + (f"{{{matcher}}}" if matcher else "")
    query = f"label_values({series}, {name})"
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        # The plain-string form: every Grafana version migrates it into its query editor.
        "definition": query, "query": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def _panel_json(i: int, panel: Panel) -> dict[str, Any]:
    return {
        "id": i + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": {"lineWidth": 1}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend,
                     "refId": chr(ord("A") + j)} for j, t in enumerate(panel.targets)],
    }


def dashboard() -> dict[str, Any]:
    datasource_var = {
        "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
        "current": {"text": "Prometheus", "value": "attnserve-prometheus"},
    }
    return {
        "uid": "attnserve", "title": "attnserve: where end-to-end latency goes",
        "description": "Latency, throughput, KV cache and the engine step split into "
                       "attention and the rest, by attention backend, KV layout, page size, "
                       "variant and replica (metrics: docs/metrics.md).",
        "tags": ["attnserve", "llm-serving"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [
            datasource_var,
            _variable("model_name", []),
            _variable("attention_backend", ["model_name"]),
            _variable("kv_layout", ["model_name", "attention_backend"]),
            _variable("replica", ["model_name", "attention_backend", "kv_layout"]),
        ]},
        "panels": [_panel_json(i, p) for i, p in enumerate(panels())],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
