"""EngineMetrics fed by a simulated engine: random requests, steps and scheduler stats, checked
against the same quantities computed independently from the simulation's own timeline."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.request import FinishReason, Request, SamplingParams
from scheduler.scheduler import SchedulerStats
from server.engine.metrics import (
    DEFAULT_LATENCY_BUCKETS,
    ENGINE_LABELS,
    EngineMetrics,
    parse_buckets,
)

LABELS = {"model_name": "tiny", "attention_backend": "reference", "kv_layout": "hnd",
          "page_size": "8", "attention_variant": "softcap(30)", "kv_cache_dtype": "fp8_e4m3",
          "tp_size": "1"}


def parse_exposition(body: bytes) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition as (name, labels, value)."""
    out = []
    for family in text_string_to_metric_families(body.decode()):
        out.extend((s.name, dict(s.labels), float(s.value)) for s in family.samples)
    return out


def sample(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels`."""
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def make_metrics(**kw: object) -> EngineMetrics:
    return EngineMetrics("tiny", "reference", "hnd", 8, "softcap(30)",  # type: ignore[arg-type]
                         kv_cache_dtype="fp8_e4m3", **kw)


@dataclass
class SimulatedRequest:
    request: Request
    token_times: list[float] = field(default_factory=list)


def simulate(rng: random.Random, metrics: EngineMetrics, n: int) -> list[SimulatedRequest]:
    """Interleave `n` requests on a fake monotonic clock, calling the hooks as the engine does."""
    sims = []
    for i in range(n):
        arrival = rng.uniform(0, 5)
        req = Request(f"r{i}", [rng.randrange(1000) for _ in range(rng.randint(1, 40))],
                      SamplingParams(max_tokens=8), arrival_time=arrival)
        req.first_scheduled_time = arrival + rng.uniform(0, 0.3)
        t = req.first_scheduled_time + rng.uniform(0.001, 0.2)
        sim = SimulatedRequest(req)
        for _ in range(rng.randint(1, 9)):
            sim.token_times.append(t)
            t += rng.uniform(0.0004, 0.05)
        sims.append(sim)
    events = sorted((t, k, j) for j, s in enumerate(sims) for k, t in enumerate(s.token_times))
    for now, k, j in events:
        sim = sims[j]
        req = sim.request
        req.output_token_ids.append(rng.randrange(1000))
        if k == 0:
            req.first_token_time = now - rng.uniform(0, 1e-4)  # set by the scheduler, earlier
        metrics.on_tokens(req, 1, now)
        if k == len(sim.token_times) - 1:
            req.finish_reason = rng.choice([FinishReason.STOP, FinishReason.LENGTH])
            req.finished_time = now
            metrics.on_request_finished(req, now)
    return sims


def check_histogram(samples, name: str, values: list[float], buckets, **labels: str) -> None:
    assert sample(samples, name + "_count", **labels) == len(values)
    assert sample(samples, name + "_sum", **labels) == pytest.approx(sum(values), abs=1e-9)
    ordered = sorted(values)
    for le in buckets:
        expected = bisect.bisect_right(ordered, le)
        got = sample(samples, name + "_bucket", le=str(float(le)), **labels)
        assert got == expected, (name, le)


def test_request_histograms_and_token_counters_match_the_timeline() -> None:
    rng = random.Random()
    metrics = make_metrics()
    sims = simulate(rng, metrics, rng.randint(5, 25))
    samples = parse_exposition(metrics.render()[0])
    reqs = [s.request for s in sims]
    ttft = [r.first_token_time - r.arrival_time for r in reqs]
    e2e = [r.finished_time - r.arrival_time for r in reqs]
    itl = [b - a for s in sims for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    tpot = [(e - t) / (len(r.output_token_ids) - 1)
            for r, t, e in zip(reqs, ttft, e2e, strict=True) if len(r.output_token_ids) > 1]
    p = "attnserve_"
    check_histogram(samples, p + "time_to_first_token_seconds", ttft, DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "e2e_request_latency_seconds", e2e, DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "inter_token_latency_seconds", itl, DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "request_time_per_output_token_seconds", tpot,
                    DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "request_queue_time_seconds",
                    [r.first_scheduled_time - r.arrival_time for r in reqs],
                    DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "request_prefill_time_seconds",
                    [r.first_token_time - r.first_scheduled_time for r in reqs],
                    DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "request_decode_time_seconds",
                    [r.finished_time - r.first_token_time for r in reqs], DEFAULT_LATENCY_BUCKETS)
    check_histogram(samples, p + "request_prompt_tokens", [r.num_prompt_tokens for r in reqs],
                    (1, 10, 50))
    check_histogram(samples, p + "request_generation_tokens",
                    [len(r.output_token_ids) for r in reqs], (1, 2, 5, 10))
    assert sample(samples, p + "prompt_tokens_total") == sum(r.num_prompt_tokens for r in reqs)
    assert sample(samples, p + "generation_tokens_total") == sum(
        len(r.output_token_ids) for r in reqs)
    for reason in FinishReason:
        expected = sum(r.finish_reason is reason for r in reqs)
        got = sample(samples, p + "request_success_total", finished_reason=reason.value)
        assert got == expected


def test_every_series_carries_the_engine_labels() -> None:
    metrics = make_metrics()
    simulate(random.Random(), metrics, 3)
    metrics.on_step("mixed", 40, 0.02, 0.004)
    metrics.on_gauges(1, 2, stats(10, 3, 2, 5, 1))
    metrics.set_info({"max_num_seqs": 4})
    samples = parse_exposition(metrics.render()[0])
    names = {n for n, _, _ in samples}
    assert len(names) > 40
    for name, labels, _ in samples:
        assert name.startswith("attnserve_"), name
        assert {k: labels.get(k) for k in ENGINE_LABELS} == LABELS, (name, labels)


def test_steps_split_by_phase_and_attention_when_measured() -> None:
    rng = random.Random()
    metrics = make_metrics()
    steps = []
    for _ in range(rng.randint(20, 60)):
        phase = rng.choice(["prefill", "decode", "mixed"])
        step_s = rng.uniform(0.0003, 0.08)
        # None: a step with timing off (the overhead benchmark's baseline)
        attention_s = step_s * rng.uniform(0.05, 0.9) if rng.random() < 0.9 else None
        tokens = rng.randint(1, 3000)
        steps.append((phase, tokens, step_s, attention_s))
        metrics.on_step(phase, tokens, step_s, attention_s)
    samples = parse_exposition(metrics.render()[0])
    p = "attnserve_"
    for phase in ("prefill", "decode", "mixed"):
        mine = [s for s in steps if s[0] == phase]
        timed = [s for s in mine if s[3] is not None]
        check_histogram(samples, p + "step_duration_seconds", [s[2] for s in mine],
                        DEFAULT_LATENCY_BUCKETS, phase=phase)
        check_histogram(samples, p + "attention_duration_seconds", [s[3] for s in timed],
                        DEFAULT_LATENCY_BUCKETS, phase=phase)
    assert not any(name.startswith(p + "attention_timed") for name, _, _ in samples)
    check_histogram(samples, p + "iteration_tokens", [s[1] for s in steps], (1, 64, 2048, 4096))


def stats(total: int, free: int, evictable: int, queries: int, hits: int) -> SchedulerStats:
    return SchedulerStats(
        num_pages_total=total, num_pages_free=free, num_pages_cached=evictable + 1,
        num_pages_cached_evictable=evictable, num_pages_in_use=total - free - evictable,
        prefix_cache_queries_tokens=queries, prefix_cache_hit_tokens=hits,
        num_preemptions_total=0, num_running=0, num_waiting=0,
    )


def test_gauges_and_prefix_counters_follow_the_scheduler_totals() -> None:
    rng = random.Random()
    metrics = make_metrics()
    queries = hits = 0
    total = rng.randint(50, 500)
    for _ in range(rng.randint(5, 30)):
        queries += rng.randint(0, 200)
        hits += rng.randint(0, 50)
        free = rng.randint(0, total)
        evictable = rng.randint(0, total - free)
        running, waiting = rng.randint(0, 64), rng.randint(0, 64)
        metrics.on_gauges(running, waiting, stats(total, free, evictable, queries, hits))
        samples = parse_exposition(metrics.render()[0])
        p = "attnserve_"
        assert sample(samples, p + "num_requests_running") == running
        assert sample(samples, p + "num_requests_waiting") == waiting
        assert sample(samples, p + "kv_cache_pages") == total
        assert sample(samples, p + "kv_cache_usage_perc") == pytest.approx(
            (total - free - evictable) / total)
        assert sample(samples, p + "prefix_cache_queries_total") == queries
        assert sample(samples, p + "prefix_cache_hits_total") == hits


def test_preemptions_and_failures_are_counted() -> None:
    metrics = make_metrics()
    counts = [random.randint(0, 3) for _ in range(10)]
    for c in counts:
        metrics.on_preemption(c)
    metrics.on_request_failed("error")
    metrics.on_request_failed("error")
    metrics.on_request_failed("timeout")
    samples = parse_exposition(metrics.render()[0])
    assert sample(samples, "attnserve_num_preemptions_total") == sum(counts)
    assert sample(samples, "attnserve_request_failure_total", reason="error") == 2
    assert sample(samples, "attnserve_request_failure_total", reason="timeout") == 1


def test_info_metric_holds_the_configuration() -> None:
    metrics = make_metrics()
    metrics.set_info({"attention_backend": "auto", "kv_layout": "hnd", "max_num_seqs": 12,
                      "model": None})
    samples = parse_exposition(metrics.render()[0])
    info = [lab for n, lab, _ in samples if n == "attnserve_engine_config_info"]
    assert len(info) == 1
    assert info[0]["max_num_seqs"] == "12" and info[0]["model"] == ""
    assert info[0]["configured_attention_backend"] == "auto"
    assert "configured_kv_layout" not in info[0]


def test_buckets_are_configurable_and_validated() -> None:
    buckets = sorted(random.sample([0.0005 * k for k in range(1, 200)], 5))
    metrics = make_metrics(buckets=buckets)
    metrics.on_step("decode", 1, buckets[2], None)
    samples = parse_exposition(metrics.render()[0])
    les = sorted({float(lab["le"]) for n, lab, _ in samples
                  if n == "attnserve_step_duration_seconds_bucket" and lab["phase"] == "decode"})
    assert les == [*buckets, float("inf")]
    assert DEFAULT_LATENCY_BUCKETS[0] == 0.0005
    assert parse_buckets("0.001, 0.01,0.1") == [0.001, 0.01, 0.1]
    for bad in ("", "0.1,0.01", "0,1", "a,b"):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_two_engines_do_not_share_a_registry() -> None:
    a, b = make_metrics(), make_metrics()
    a.on_preemption(3)
    assert sample(parse_exposition(b.render()[0]), "attnserve_num_preemptions_total") == 0
    body, content_type = a.render()
    assert content_type.startswith("text/plain")
    assert sample(parse_exposition(body), "attnserve_num_preemptions_total") == 3


def test_request_aborted_before_its_first_token_has_no_token_timings() -> None:
    metrics = make_metrics()
    arrival = random.uniform(0, 100)
    req = Request("a", [1, 2, 3], SamplingParams(), arrival_time=arrival)
    req.first_scheduled_time = arrival + 0.25
    req.finish_reason = FinishReason.ABORT
    req.finished_time = arrival + 0.75
    metrics.on_request_finished(req, arrival + 1.0)
    samples = parse_exposition(metrics.render()[0])
    assert sample(samples, "attnserve_request_success_total", finished_reason="abort") == 1
    assert sample(samples, "attnserve_e2e_request_latency_seconds_sum") == pytest.approx(0.75)
    assert sample(samples, "attnserve_request_queue_time_seconds_sum") == pytest.approx(0.25)
    for name in ("time_to_first_token_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_time_per_output_token_seconds"):
        assert sample(samples, f"attnserve_{name}_count") == 0, name
