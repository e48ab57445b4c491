"""Prometheus metrics of one engine, with vLLM's names and meanings under the prefix attnserve_.

`EngineMetrics` implements the engine's observer hooks (server/engine/outputs.py EngineObserver),
which the engine calls from its own thread, and renders the Prometheus text format for
GET /metrics. Every series carries the labels model_name, attention_backend, kv_layout,
page_size, attention_variant, kv_cache_dtype and tp_size (the tensor-parallel size: the
series are rank 0's, exported once for the whole group) (and replica, for a server started
with --replica-name), so runs with different kernels, layouts, KV storage and splits, and the
replicas behind a router, can share one Prometheus.

Definitions (as vLLM): TTFT = first token - arrival; ITL = time between consecutive token
outputs of a request; TPOT = (e2e - TTFT) / (generated tokens - 1); queue time = first
scheduled - arrival; prefill time = first token - first scheduled; decode time = finished -
first token. Every step's time is split into attention (measured inside the model, see
model/attention_timing.py and docs/metrics.md) and the rest.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from scheduler.config import SchedulerStats
from scheduler.request import FinishReason, Request

if TYPE_CHECKING:
    from server.engine.core import EngineCore

PREFIX = "attnserve_"
ENGINE_LABELS = ("model_name", "attention_backend", "kv_layout", "page_size", "attention_variant",
                 "kv_cache_dtype", "tp_size")
PHASES = ("prefill", "decode", "mixed")

# Seconds. Starts at 0.5 ms: a small model's decode step takes a few milliseconds.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)
# Token counts: prompt and generation lengths per request, tokens per step.
REQUEST_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
)
STEP_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)


def parse_buckets(text: str) -> list[float]:
    """Parse a comma-separated bucket list in seconds (the --latency-buckets flag)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"latency buckets must be comma-separated numbers, got {text!r}") from None
    validate_buckets(values)
    return values


def validate_buckets(values: Sequence[float]) -> None:
    if not values:
        raise ValueError("at least one latency bucket is needed")
    if any(v <= 0 for v in values):
        raise ValueError("latency buckets must be positive")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("latency buckets must be strictly increasing")


@dataclass
class _RequestProgress:
    """Per-request state between token outputs (kept only while the request lives)."""

    last_token_time: float


class EngineMetrics:
    """The engine's observer: records requests, steps and KV state into its own registry."""

    def __init__(
        self,
        model_name: str,
        attention_backend: str,
        kv_layout: str,
        page_size: int,
        attention_variant: str = "softmax",
        buckets: list[float] | None = None,
        registry: CollectorRegistry | None = None,
        kv_cache_dtype: str = "float32",
        replica: str | None = None,
        tp_size: int = 1,
    ) -> None:
        latency = list(buckets) if buckets is not None else list(DEFAULT_LATENCY_BUCKETS)
        validate_buckets(latency)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.label_values = {
            "model_name": model_name, "attention_backend": attention_backend,
            "kv_layout": kv_layout, "page_size": str(page_size),
            "attention_variant": attention_variant, "kv_cache_dtype": kv_cache_dtype,
            "tp_size": str(tp_size),
        }
        # A constant `replica` label on every series when the server has a replica name
        # (`--replica-name`), so replicas behind a router stay apart in one Prometheus.
        self.label_names: tuple[str, ...] = ENGINE_LABELS
        if replica:
            self.label_values["replica"] = replica
            self.label_names = (*ENGINE_LABELS, "replica")
        # Request ids are not unique forever and requests are dropped by the engine when
        # they end (or fail without reaching us), so the state is keyed weakly by object.
        self._progress: weakref.WeakKeyDictionary[Request, _RequestProgress] = (
            weakref.WeakKeyDictionary()
        )
        self._last_prefix_queries: int | None = None
        self._last_prefix_hits: int | None = None
        self._build(latency)

    @classmethod
    def attach(cls, core: EngineCore, buckets: list[float] | None = None,
               replica: str | None = None) -> Self:
        """Metrics labelled with what `core` resolved (backend, layout, page size, variant,
        model name, KV cache dtype, tensor-parallel size) and the replica name if any, its
        configuration published, attached as its observer before any step."""
        metrics = cls(core.model_name, core.backend.name, core.layout.name,
                      core.layout.page_size, str(core.backend.config.variant), buckets=buckets,
                      kv_cache_dtype=core.kv_dtype.name, replica=replica,
                      tp_size=core.config.tensor_parallel_size)
        metrics.set_info(core.effective_config(), core.config.as_dict())
        core.observer = metrics
        return metrics

    # ---- construction ---------------------------------------------------------------------
    def _histogram(self, name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        metric = Histogram(PREFIX + name, doc, self.label_names, registry=self.registry,
                           buckets=buckets)
        return metric.labels(**self.label_values)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, self.label_names, registry=self.registry).labels(
            **self.label_values
        )

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, self.label_names, registry=self.registry).labels(
            **self.label_values
        )

    def _build(self, latency: list[float]) -> None:
        h = self._histogram
        self.ttft = h("time_to_first_token_seconds",
                      "Time from a request's arrival to its first generated token.", latency)
        self.itl = h("inter_token_latency_seconds",
                     "Time between consecutive token outputs of a request.", latency)
        self.tpot = h("request_time_per_output_token_seconds",
                      "Per request: (e2e - TTFT) / (generated tokens - 1).", latency)
        self.e2e = h("e2e_request_latency_seconds",
                     "Time from a request's arrival to its last token.", latency)
        self.queue_time = h("request_queue_time_seconds",
                            "Time from arrival until first scheduled.", latency)
        self.prefill_time = h("request_prefill_time_seconds",
                              "Time from first scheduled to the first token.", latency)
        self.decode_time = h("request_decode_time_seconds",
                             "Time from the first token to the last token.", latency)
        self.prompt_tokens_hist = h("request_prompt_tokens",
                                    "Prompt length of finished requests.", REQUEST_TOKEN_BUCKETS)
        self.generation_tokens_hist = h("request_generation_tokens",
                                        "Generated tokens of finished requests.",
                                        REQUEST_TOKEN_BUCKETS)
        self.iteration_tokens = h("iteration_tokens",
                                  "Tokens computed per engine step (prefill chunks + decodes).",
                                  STEP_TOKEN_BUCKETS)
        phase_labels = (*self.label_names, "phase")
        step = Histogram(PREFIX + "step_duration_seconds",
                         "Wall time of one engine step (schedule excluded), by phase.",
                         phase_labels, registry=self.registry, buckets=latency)
        attention = Histogram(PREFIX + "attention_duration_seconds",
                              "Time inside the attention backend during one step, by phase.",
                              phase_labels, registry=self.registry, buckets=latency)
        self._step, self._attention = step, attention
        # hybrid models only (softmax and linear layers); the sum is attention_duration
        self._attention_kind = Histogram(
            PREFIX + "attention_kind_duration_seconds",
            "Time inside the attention backend during one step of a hybrid model, by phase "
            "and attention kind (softmax, linear).", (*phase_labels, "attention_kind"),
            registry=self.registry, buckets=latency)
        for p in PHASES:  # present from the start, so dashboards show zeros, not "no data"
            self._by_phase(p)

        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of requests that "
                                           "produced a first token.")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                          (*self.label_names, "finished_reason"), registry=self.registry)
        self._success = success
        for reason in FinishReason:
            success.labels(**self.label_values, finished_reason=reason.value)
        failure = Counter(PREFIX + "request_failure", "Requests that failed inside the engine.",
                          (*self.label_names, "reason"), registry=self.registry)
        self._failure = failure
        failure.labels(**self.label_values, reason="error")
        failure.labels(**self.label_values, reason="abort")
        self.prefix_queries = self._counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = self._counter("prefix_cache_hits",
                                         "Prompt tokens served from the prefix cache.")
        self.preemptions = self._counter("num_preemptions", "Requests preempted (recomputed).")
        self.kernel_compiles = self._counter(
            "kernel_compiles", "Triton kernel instances built (compiled or loaded from the disk "
            "cache) after start-up; each one stalled the step that needed it.")
        self.kernel_compile_step_seconds = self._counter(
            "kernel_compile_step_seconds", "Wall time of the steps that built those instances.")

        self.running = self._gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = self._gauge("kv_cache_usage_perc",
                                    "Fraction of KV pages held by requests (1 = full).")
        # not "..._total": that suffix is for counters (promtool's lint)
        self.kv_pages = self._gauge("kv_cache_pages", "KV pages in the pool.")
        self.state_slots = self._gauge(
            "state_slots", "Hybrid models: recurrent-state slots (0 for other models).")
        self.state_usage = self._gauge(
            "state_slots_usage_perc", "Hybrid models: fraction of state slots held by running "
            "requests and by the snapshots their chunks are writing (the prefix cache's "
            "snapshots count as free: they are evicted on demand).")
        self.state_snapshots = self._gauge(
            "state_snapshots", "Hybrid models: state snapshots the prefix cache holds.")
        self._info = Info(PREFIX + "engine_config", "The engine's start-up configuration.",
                          self.label_names, registry=self.registry)
        self.set_info({})

    # ---- configuration --------------------------------------------------------------------
    def set_info(self, config: dict, configured: dict | None = None) -> None:
        """Publish the engine's configuration as attnserve_engine_config_info.

        `config` holds the effective values (what `auto` and unset fields resolved to:
        EngineCore.effective_config); a `configured` value that differs from its effective
        one (e.g. dtype "auto") is kept as configured_<key>. Keys that are also engine labels
        are published by the labels.
        """
        configured = configured or {}
        values: dict[str, str] = {}
        for key, value in config.items():
            text = "" if value is None else str(value)
            given = configured.get(key)
            if given is not None and str(given) != text:
                values[f"configured_{key}"] = str(given)
            if key in ENGINE_LABELS:
                if text != self.label_values[key]:
                    values[f"configured_{key}"] = text
                continue
            values[str(key)] = text
        self._info.labels(**self.label_values).info(values)

    # ---- observer hooks (engine thread) ---------------------------------------------------
    def _by_phase(self, phase: str) -> tuple[Histogram, Histogram]:
        return (self._step.labels(**self.label_values, phase=phase),
                self._attention.labels(**self.label_values, phase=phase))

    def on_step(
        self, phase: str, num_tokens: int, step_s: float, attention_s: float | None
    ) -> None:
        step, attention = self._by_phase(phase)
        step.observe(step_s)
        self.iteration_tokens.observe(num_tokens)
        if attention_s is not None:  # None only when timing is off (a benchmark baseline)
            attention.observe(attention_s)

    def on_attention_kinds(self, phase: str, seconds: dict[str, float]) -> None:
        for kind, value in seconds.items():
            self._attention_kind.labels(**self.label_values, phase=phase,
                                        attention_kind=kind).observe(value)

    def on_tokens(self, request: Request, num_new: int, now: float) -> None:
        if num_new <= 0:
            return
        self.generation_tokens.inc(num_new)
        progress = self._progress.get(request)
        if progress is None:
            first = request.first_token_time if request.first_token_time is not None else now
            self.ttft.observe(max(0.0, first - request.arrival_time))
            self.prompt_tokens.inc(request.num_prompt_tokens)
            self._progress[request] = _RequestProgress(last_token_time=now)
            return
        self.itl.observe(max(0.0, now - progress.last_token_time))
        progress.last_token_time = now

    def on_request_finished(self, request: Request, now: float) -> None:
        self._progress.pop(request, None)
        reason = request.finish_reason.value if request.finish_reason else FinishReason.STOP.value
        self._success.labels(**self.label_values, finished_reason=reason).inc()
        finished = request.finished_time if request.finished_time is not None else now
        arrival = request.arrival_time
        e2e = max(0.0, finished - arrival)
        self.e2e.observe(e2e)
        num_generated = len(request.output_token_ids)
        self.prompt_tokens_hist.observe(request.num_prompt_tokens)
        self.generation_tokens_hist.observe(num_generated)
        if request.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, request.first_scheduled_time - arrival))
        first_token = request.first_token_time
        if first_token is None:
            return  # finished (aborted) before producing a token: no token-phase timings
        if request.first_scheduled_time is not None:
            self.prefill_time.observe(max(0.0, first_token - request.first_scheduled_time))
        self.decode_time.observe(max(0.0, finished - first_token))
        if num_generated > 1:
            ttft = first_token - arrival
            self.tpot.observe(max(0.0, (e2e - ttft) / (num_generated - 1)))

    def on_request_failed(self, reason: str) -> None:
        self._failure.labels(**self.label_values, reason=reason).inc()

    def on_preemption(self, count: int) -> None:
        if count > 0:
            self.preemptions.inc(count)

    def on_kernel_compile(self, count: int, step_s: float) -> None:
        self.kernel_compiles.inc(count)
        self.kernel_compile_step_seconds.inc(step_s)

    def on_gauges(self, num_running: int, num_waiting: int, stats: SchedulerStats) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        total = stats.num_pages_total
        self.kv_pages.set(total)
        # Pages only the prefix cache holds count as free, as in vLLM: they are reclaimed on
        # demand, so they do not limit admission (num_pages_in_use leaves them out).
        if total:
            self.kv_usage.set(min(1.0, max(0.0, stats.num_pages_in_use / total)))
        slots = stats.num_state_slots_total
        self.state_slots.set(slots)
        self.state_snapshots.set(stats.num_state_snapshots)
        if slots:
            held = slots - stats.num_state_slots_free - stats.num_state_snapshots
            self.state_usage.set(min(1.0, max(0.0, held / slots)))
        self._last_prefix_queries = self._feed_delta(
            self.prefix_queries, self._last_prefix_queries, stats.prefix_cache_queries_tokens)
        self._last_prefix_hits = self._feed_delta(
            self.prefix_hits, self._last_prefix_hits, stats.prefix_cache_hit_tokens)

    @staticmethod
    def _feed_delta(counter: Counter, previous: int | None, total: int) -> int:
        """Advance `counter` by the growth of a running total that started at 0. A total
        that went down means the source restarted counting from 0."""
        growth = total if previous is None or total < previous else total - previous
        if growth > 0:
            counter.inc(growth)
        return total

    # ---- exposition -----------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
