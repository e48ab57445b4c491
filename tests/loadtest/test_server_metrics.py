"""Deltas of the server's /metrics over a run, from a real prometheus_client exposition."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest

from loadtest.server_metrics import MetricsSnapshot, server_metrics_delta

LABELS = {"model_name": "m", "attention_backend": "triton", "kv_layout": "hnd",
          "page_size": "16"}


class _FakeServer:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        names = list(LABELS)
        self.ttft = Histogram("attnserve_time_to_first_token_seconds", "", names, registry=reg)
        self.step = Histogram("attnserve_step_duration_seconds", "", [*names, "phase"],
                              registry=reg)
        self.attn = Histogram("attnserve_attention_duration_seconds", "", [*names, "phase"],
                              registry=reg)
        self.timed = Counter("attnserve_attention_timed_step_seconds", "", [*names, "phase"],
                             registry=reg)
        self.counters = {name: Counter(f"attnserve_{name}", "", names, registry=reg)
                         for name in ("prefix_cache_queries", "prefix_cache_hits",
                                      "num_preemptions", "prompt_tokens", "generation_tokens",
                                      "kernel_compiles")}
        info = Info("attnserve_engine_config", "", names, registry=reg)
        info.labels(**LABELS).info({"max_num_seqs": "8"})

    def text(self) -> str:
        return generate_latest(self.registry).decode()


def test_deltas_over_the_run() -> None:
    rng = np.random.default_rng()
    server = _FakeServer()
    # Activity before the run must not count.
    server.ttft.labels(**LABELS).observe(5.0)
    server.counters["prompt_tokens"].labels(**LABELS).inc(1000)
    before = MetricsSnapshot.parse(server.text())
    ttfts = rng.uniform(0.01, 0.3, size=17)
    for t in ttfts:
        server.ttft.labels(**LABELS).observe(float(t))
    step = {"prefill": 0.0, "decode": 0.0}
    attn = {"prefill": 0.0, "decode": 0.0}
    timed = {"prefill": 0.0, "decode": 0.0}
    for i in range(40):
        phase = "prefill" if i % 4 == 0 else "decode"
        s = float(rng.uniform(0.01, 0.05))
        server.step.labels(**LABELS, phase=phase).observe(s)
        step[phase] += s
        if i % 3 == 0:  # attention is timed on some steps only
            a = s * float(rng.uniform(0.2, 0.6))
            server.attn.labels(**LABELS, phase=phase).observe(a)
            server.timed.labels(**LABELS, phase=phase).inc(s)
            attn[phase] += a
            timed[phase] += s
    server.counters["prefix_cache_queries"].labels(**LABELS).inc(400)
    server.counters["prefix_cache_hits"].labels(**LABELS).inc(100)
    server.counters["num_preemptions"].labels(**LABELS).inc(2)
    server.counters["prompt_tokens"].labels(**LABELS).inc(321)
    server.counters["generation_tokens"].labels(**LABELS).inc(77)
    server.counters["kernel_compiles"].labels(**LABELS).inc(3)
    after = MetricsSnapshot.parse(server.text())

    out = server_metrics_delta(before, after)
    assert out["available"]
    assert out["server_mean_ttft_ms"] == pytest.approx(ttfts.mean() * 1000)
    assert out["server_ttft_count"] == 17
    assert out["attention_share_of_step_time"] == pytest.approx(
        sum(attn.values()) / sum(timed.values()))
    for phase in ("prefill", "decode"):
        assert out["attention_share_by_phase"][phase] == pytest.approx(
            attn[phase] / timed[phase])
    assert out["step_time_s"] == pytest.approx(sum(step.values()))
    assert out["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert out["num_preemptions"] == 2
    assert out["prompt_tokens"] == 321 and out["generation_tokens"] == 77
    assert out["kernel_builds"] == 3
    assert out["server_config"]["kv_layout"] == ["hnd"]
    assert out["engine_config"]["max_num_seqs"] == "8"


def test_a_server_without_these_metrics_gives_nulls() -> None:
    other = CollectorRegistry()
    Counter("vllm_prompt_tokens", "", registry=other).inc(3)
    snap = MetricsSnapshot.parse(generate_latest(other).decode())
    out = server_metrics_delta(snap, snap)
    assert out["available"]
    assert out["server_mean_ttft_ms"] is None and out["attention_share_of_step_time"] is None
    assert out["prompt_tokens"] is None and out["prefix_cache_hit_rate"] is None
    assert out["kernel_builds"] is None
    assert server_metrics_delta(None, snap) == {"available": False}


def test_no_timed_step_in_the_run_gives_no_attention_share() -> None:
    server = _FakeServer()
    server.timed.labels(**LABELS, phase="decode").inc(0.5)  # timed before the run only
    server.attn.labels(**LABELS, phase="decode").observe(0.2)
    before = MetricsSnapshot.parse(server.text())
    server.step.labels(**LABELS, phase="decode").observe(0.04)  # untimed steps in the run
    out = server_metrics_delta(before, MetricsSnapshot.parse(server.text()))
    assert out["step_time_s"] == pytest.approx(0.04)
    assert out["attention_share_of_step_time"] is None
    assert out["attention_share_by_phase"]["decode"] is None
