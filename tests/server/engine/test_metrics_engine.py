"""EngineMetrics on the real engine (SmolLM2 on CPU, offline): step and attention histograms
per phase, attention <= step time, and the scheduler-fed counters and gauges."""

from __future__ import annotations

import random

import pytest

from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore
from server.engine.metrics import EngineMetrics
from tests.server.engine.test_metrics_unit import parse_exposition, sample
from tests.server.engine_fixtures import smollm2

pytestmark = pytest.mark.timeout(600)
P = "attnserve_"


class RecordingMetrics(EngineMetrics):
    """EngineMetrics that also keeps every on_step call, the reference for the histograms."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.steps: list[tuple[str, int, float, float | None]] = []

    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None
                ) -> None:
        self.steps.append((phase, num_tokens, step_s, attention_s))
        super().on_step(phase, num_tokens, step_s, attention_s)


def make_engine(**overrides: object) -> tuple[EngineCore, RecordingMetrics]:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=2048,
                          max_model_len=512, seed=0)
    for key, value in overrides.items():
        setattr(config, key, value)
    engine = EngineCore(config, loaded=smollm2())
    metrics = RecordingMetrics.attach(engine)
    assert engine.observer is metrics
    return engine, metrics


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def run_to_completion(engine: EngineCore, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    stats = engine.scheduler.stats
    raise AssertionError(f"the engine did not finish its requests: {stats}")


def test_step_and_attention_histograms_cover_every_phase() -> None:
    rng = random.Random()
    # A small token budget chunks the late long prompt, so it shares steps with decodes.
    engine, metrics = make_engine(max_num_batched_tokens=48)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        engine.add_request(random_prompt(rng, rng.randint(8, 30)), params)
    for _ in range(4):  # prefill, then decodes
        engine.step()
    engine.add_request(random_prompt(rng, rng.randint(100, 140)), params)
    run_to_completion(engine)

    steps = metrics.steps
    phases = {phase for phase, _, _, _ in steps}
    assert phases == {"prefill", "decode", "mixed"}, phases
    for phase_, _, step_s, attention_s in steps:  # every step has its attention time
        assert attention_s is not None and 0 < attention_s <= step_s, (phase_, attention_s)

    samples = parse_exposition(metrics.render()[0])
    for phase in ("prefill", "decode", "mixed"):
        timed = mine = [s for s in steps if s[0] == phase]
        assert sample(samples, P + "step_duration_seconds_count", phase=phase) == len(mine)
        assert sample(samples, P + "attention_duration_seconds_count", phase=phase) == len(mine)
        step_sum = sample(samples, P + "step_duration_seconds_sum", phase=phase)
        attention_sum = sample(samples, P + "attention_duration_seconds_sum", phase=phase)
        assert step_sum == pytest.approx(sum(s[2] for s in mine))
        assert attention_sum == pytest.approx(sum(s[3] for s in mine))
        assert 0 < attention_sum < step_sum
        # Bucket-wise: no more attention observations above any bound than step observations
        # above it, because each timed step's attention fits inside that step.
        for le in ("0.001", "0.005", "0.01", "0.05", "0.1", "0.5"):
            attn_above = len(timed) - sample(
                samples, P + "attention_duration_seconds_bucket", phase=phase, le=le)
            step_above = len(timed) - sum(1 for s in timed if s[2] <= float(le))
            assert attn_above <= step_above, (phase, le)
    assert sample(samples, P + "iteration_tokens_sum") == sum(s[1] for s in steps)


def test_preemptions_prefix_cache_and_kv_gauges_match_the_scheduler() -> None:
    rng = random.Random()
    # 8 pages of 4 tokens: three requests admitted at 2 pages each grow to 4-5 pages each,
    # so the scheduler must preempt; the shared first page gives prefix-cache hits.
    engine, metrics = make_engine(kv_cache_tokens=32, page_size=4, max_num_seqs=3)
    shared = random_prompt(rng, 4)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for _ in range(3):
        engine.add_request(shared + random_prompt(rng, rng.randint(2, 4)), params)
    peak_usage = 0.0
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        engine.step()
        s = engine.scheduler.stats
        samples = parse_exposition(metrics.render()[0])
        usage = sample(samples, P + "kv_cache_usage_perc")
        assert usage == pytest.approx(s.num_pages_in_use / s.num_pages_total)
        peak_usage = max(peak_usage, usage)
    stats = engine.scheduler.stats
    samples = parse_exposition(metrics.render()[0])
    assert stats.num_preemptions_total > 0
    assert sample(samples, P + "num_preemptions_total") == stats.num_preemptions_total
    assert stats.prefix_cache_hit_tokens > 0
    assert sample(samples, P + "prefix_cache_queries_total") == stats.prefix_cache_queries_tokens
    assert sample(samples, P + "prefix_cache_hits_total") == stats.prefix_cache_hit_tokens
    assert sample(samples, P + "kv_cache_pages") == stats.num_pages_total
    assert peak_usage > 0.5
    assert sample(samples, P + "num_requests_running") == 0
    assert sample(samples, P + "request_success_total", finished_reason="length") == 3
    assert sample(samples, P + "generation_tokens_total") == 3 * 10
