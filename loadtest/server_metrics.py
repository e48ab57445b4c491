"""The server's own Prometheus metrics, scraped before and after a run, as deltas.

Only ``prometheus_client``'s text parser is used (no server code). Anything the server
does not export comes out as None, so the client works against any server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PREFIX = "attnserve_"
CONFIG_LABELS = ("model_name", "attention_backend", "kv_layout", "page_size")
LabelSet = tuple[tuple[str, str], ...]


@dataclass
class MetricsSnapshot:
    """Every sample of the exposition, keyed by sample name and sorted labels."""

    samples: dict[tuple[str, LabelSet], float]

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        samples: dict[tuple[str, LabelSet], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return cls(samples)

    def total(self, name: str, **label_filter: str) -> float | None:
        """Sum of the samples called ``name`` whose labels match; None when there are none."""
        values = [
            v for (n, labels), v in self.samples.items()
            if n == name and all(dict(labels).get(k) == want for k, want in label_filter.items())
        ]
        return sum(values) if values else None

    def info_labels(self, name: str) -> dict[str, str]:
        """The labels of an Info metric's sample (the first one found)."""
        for (n, labels) in self.samples:
            if n == name:
                return dict(labels)
        return {}

    def label_values(self, label: str) -> list[str]:
        found = {dict(labels)[label] for (n, labels) in self.samples
                 if n.startswith(PREFIX) and label in dict(labels)}
        return sorted(found)


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> MetricsSnapshot | None:
    try:
        response = await client.get(path, timeout=10.0)
        if response.status_code != 200:
            logger.info("GET %s answered %d; no server metrics", path, response.status_code)
            return None
        return MetricsSnapshot.parse(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        logger.info("could not read server metrics from %s: %s", path, exc)
        return None


def _delta(before: MetricsSnapshot, after: MetricsSnapshot, name: str, **labels: str
           ) -> float | None:
    end = after.total(name, **labels)
    if end is None:
        return None
    return end - (before.total(name, **labels) or 0.0)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def server_metrics_delta(
    before: MetricsSnapshot | None, after: MetricsSnapshot | None
) -> dict[str, Any]:
    """What the server itself measured over the run (counters and histogram sums)."""
    out: dict[str, Any] = {"available": before is not None and after is not None}
    if before is None or after is None:
        return out
    d = lambda name, **labels: _delta(before, after, PREFIX + name, **labels)  # noqa: E731
    out["server_config"] = {k: after.label_values(k) for k in CONFIG_LABELS}
    out["engine_config"] = after.info_labels(PREFIX + "engine_config_info")
    ttft_sum, ttft_count = d("time_to_first_token_seconds_sum"), d(
        "time_to_first_token_seconds_count")
    ttft_mean = _ratio(ttft_sum, ttft_count)
    out["server_mean_ttft_ms"] = None if ttft_mean is None else ttft_mean * 1000.0
    out["server_ttft_count"] = ttft_count
    for key, name in (("itl", "inter_token_latency_seconds"),
                      ("tpot", "request_time_per_output_token_seconds"),
                      ("e2el", "e2e_request_latency_seconds")):
        mean = _ratio(d(name + "_sum"), d(name + "_count"))
        out[f"server_mean_{key}_ms"] = None if mean is None else mean * 1000.0
    # Attention is timed on every Nth step only; its share is taken over those steps' time
    # (attention_timed_step_seconds) when the server exports it, else over all steps.
    step_s = d("step_duration_seconds_sum")
    attn_s = d("attention_duration_seconds_sum")
    timed_s = d("attention_timed_step_seconds_total")
    out["step_time_s"] = step_s
    out["attention_time_s"] = attn_s
    out["attention_timed_step_time_s"] = timed_s
    has_timed = timed_s is not None  # no timed step in the run: share unknown (None)
    out["attention_share_of_step_time"] = _ratio(attn_s, timed_s if has_timed else step_s)
    phases = sorted(set(after.label_values("phase")))
    by_phase = {}
    for phase in phases:
        denominator = "attention_timed_step_seconds_total" if has_timed \
            else "step_duration_seconds_sum"
        by_phase[phase] = _ratio(d("attention_duration_seconds_sum", phase=phase),
                                 d(denominator, phase=phase))
    out["attention_share_by_phase"] = by_phase
    queries, hits = d("prefix_cache_queries_total"), d("prefix_cache_hits_total")
    out["prefix_cache_queries"] = queries
    out["prefix_cache_hits"] = hits
    out["prefix_cache_hit_rate"] = _ratio(hits, queries)
    out["num_preemptions"] = d("num_preemptions_total")
    # kernel instances a step had to build during the run (each stalled it; should be 0)
    out["kernel_builds"] = d("kernel_compiles_total")
    out["prompt_tokens"] = d("prompt_tokens_total")
    out["generation_tokens"] = d("generation_tokens_total")
    return out
