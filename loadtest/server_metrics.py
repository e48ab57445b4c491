"""The server's own Prometheus metrics, scraped before and after a run, as deltas.

Only ``prometheus_client``'s text parser is used (no server code). Anything the server
does not export comes out as None, so the client works against any server.

The step-time split: attnserve observes ``step_duration_seconds`` and
``attention_duration_seconds`` (histograms, label ``phase``) on every engine step, so over
a run, per phase, mean step ms = step sum / step count, mean attention ms = attention sum
/ step count, the rest = their difference, and the attention share = attention sum / step
sum (docs/metrics.md, "Load generator").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

PREFIX = "attnserve_"
# The engine labels that tell two servers apart (a new one is one more entry); each run
# records the values its server exported.
CONFIG_LABELS = ("model_name", "attention_backend", "kv_layout", "page_size",
                 "attention_variant", "kv_cache_dtype")
# Step phases: only prompt chunks, only decode tokens, or both in one step.
PHASES = ("prefill", "decode", "mixed")
LabelSet = tuple[tuple[str, str], ...]
ROUTER_METRICS_PATH = "/engine_metrics"  # SGLang's router: its workers' metrics together
# What tells the workers behind a router apart: attnserve's --replica-name label, else the
# worker URL SGLang's router adds.
REPLICA_LABELS = ("replica", "worker_addr")


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
    """The server's metrics; behind SGLang's router (no /metrics on its API port) its
    /engine_metrics, every worker's /metrics in one exposition, each sample labelled with the
    worker's `worker_addr`: totals then sum over the workers."""
    try:
        try:
            response = await client.get(path, timeout=10.0)
        except httpx.RemoteProtocolError:
            # a pooled keep-alive connection the server closed while the run went on (the
            # run's own requests may use others): once more, on a fresh connection
            response = await client.get(path, timeout=10.0)
        if response.status_code == 404 and path == "/metrics":
            return await scrape(client, ROUTER_METRICS_PATH)
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


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _split(steps: float, step_s: float, attention_s: float | None) -> dict[str, Any]:
    """Means per step of ``steps`` steps that took ``step_s`` in all, ``attention_s`` of it
    inside the attention backend (None: not known)."""
    mean_step = _ratio(step_s, steps)
    mean_attention = _ratio(attention_s, steps)
    return {
        "steps": int(round(steps)),
        "mean_step_ms": _ms(mean_step),
        "mean_attention_ms": _ms(mean_attention),
        "mean_non_attention_ms": None if mean_attention is None or mean_step is None
        else _ms(mean_step - mean_attention),
        "attention_share": _ratio(attention_s, step_s),
    }


def step_time_split(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, Any]:
    """Mean step time split into attention and the rest, per phase and over all steps.

    ``step_time_by_phase`` has an entry for every phase the server exports; a phase with no
    step in the run has ``steps`` 0 and None elsewhere. The attention numbers need the
    attention histogram to have been observed on the same steps as the step histogram
    (every step); where its count differs (a server that times a sample of the steps), they
    are None rather than a wrong share.
    """
    def d(name: str, **labels: str) -> float | None:
        return _delta(before, after, PREFIX + name, **labels)

    phases = [p for p in PHASES if after.total(PREFIX + "step_duration_seconds_count",
                                               phase=p) is not None]
    phases += [p for p in after.label_values("phase") if p not in PHASES]
    by_phase: dict[str, dict[str, Any]] = {}
    total_steps = total_step_s = 0.0
    total_attention_s: float | None = 0.0
    for phase in phases:
        steps = d("step_duration_seconds_count", phase=phase) or 0.0
        step_s = d("step_duration_seconds_sum", phase=phase) or 0.0
        attention_s = d("attention_duration_seconds_sum", phase=phase)
        attention_steps = d("attention_duration_seconds_count", phase=phase)
        # One step of slack: a scrape may fall between a step's two observations.
        if attention_steps is None or abs(attention_steps - steps) > 1:
            if steps > 0:
                logger.warning("phase %s: %s of %d steps have an attention time; no attention "
                               "split reported for it", phase, attention_steps, steps)
            attention_s = None
        by_phase[phase] = _split(steps, step_s, attention_s)
        total_steps += steps
        total_step_s += step_s
        if steps > 0:
            total_attention_s = None if attention_s is None or total_attention_s is None \
                else total_attention_s + attention_s
    overall = _split(total_steps, total_step_s, total_attention_s) if by_phase else None
    return {
        "step_time_by_phase": by_phase,
        "step_time_all": overall,
        "step_time_s": total_step_s if by_phase else None,
        "attention_time_s": None if overall is None or overall["attention_share"] is None
        else total_attention_s,
        "attention_share_of_step_time": None if overall is None else overall["attention_share"],
        "attention_share_by_phase": {p: v["attention_share"] for p, v in by_phase.items()},
    }


def attention_by_kind(before: MetricsSnapshot, after: MetricsSnapshot,
                      steps: float) -> dict[str, dict[str, float | None]]:
    """A hybrid model's attention time split by kind (softmax, linear) over the run: per
    kind, mean ms per step (over all `steps`) and its share of the attention time; empty
    for a model with one kind (the server exports no `attention_kind` series then)."""
    name = PREFIX + "attention_kind_duration_seconds_sum"
    kinds = after.label_values("attention_kind")
    seconds = {k: _delta(before, after, name, attention_kind=k) or 0.0 for k in kinds}
    total = sum(seconds.values())
    return {k: {"mean_ms": _ms(_ratio(v, steps)), "share_of_attention": _ratio(v, total)}
            for k, v in sorted(seconds.items())}


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
    out.update(step_time_split(before, after))
    all_steps = (out.get("step_time_all") or {}).get("steps") or 0.0
    out["attention_by_kind"] = attention_by_kind(before, after, all_steps)
    queries, hits = d("prefix_cache_queries_total"), d("prefix_cache_hits_total")
    out["prefix_cache_queries"] = queries
    out["prefix_cache_hits"] = hits
    out["prefix_cache_hit_rate"] = _ratio(hits, queries)
    out["num_preemptions"] = d("num_preemptions_total")
    # kernel instances a step had to build during the run (each stalled it; should be 0)
    out["kernel_builds"] = d("kernel_compiles_total")
    out["prompt_tokens"] = d("prompt_tokens_total")
    out["generation_tokens"] = d("generation_tokens_total")
    out["replicas"] = per_replica(before, after)
    return out


def per_replica(before: MetricsSnapshot, after: MetricsSnapshot) -> dict[str, dict[str, Any]]:
    """Behind a router: each worker's requests, tokens and prefix-cache hit rate over the
    run, keyed by its `replica` label (else `worker_addr`); empty for a single server."""
    for label in REPLICA_LABELS:
        names = after.label_values(label)
        if names:
            break
    else:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        def d(metric: str, name: str = name) -> float | None:
            return _delta(before, after, PREFIX + metric, **{label: name})

        queries, hits = d("prefix_cache_queries_total"), d("prefix_cache_hits_total")
        out[name] = {"requests": d("request_success_total"),
                     "prompt_tokens": d("prompt_tokens_total"),
                     "generation_tokens": d("generation_tokens_total"),
                     "prefix_cache_queries": queries, "prefix_cache_hits": hits,
                     "prefix_cache_hit_rate": _ratio(hits, queries)}
    return out
