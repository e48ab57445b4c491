"""Deltas of the server's /metrics over a run, from a real prometheus_client exposition."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest

from loadtest.server_metrics import MetricsSnapshot, server_metrics_delta

LABELS = {"model_name": "m", "attention_backend": "triton", "kv_layout": "hnd",
          "page_size": "16", "attention_variant": "softcap:30", "kv_cache_dtype": "fp8_e4m3"}
PHASES = ("prefill", "decode", "mixed")


class _FakeServer:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        names = list(LABELS)
        self.ttft = Histogram("attnserve_time_to_first_token_seconds", "", names, registry=reg)
        self.step = Histogram("attnserve_step_duration_seconds", "", [*names, "phase"],
                              registry=reg)
        self.attn = Histogram("attnserve_attention_duration_seconds", "", [*names, "phase"],
                              registry=reg)
        self.counters = {name: Counter(f"attnserve_{name}", "", names, registry=reg)
                         for name in ("prefix_cache_queries", "prefix_cache_hits",
                                      "num_preemptions", "prompt_tokens", "generation_tokens",
                                      "kernel_compiles")}
        info = Info("attnserve_engine_config", "", names, registry=reg)
        info.labels(**LABELS).info({"max_num_seqs": "8"})
        for phase in PHASES:  # created at start-up, as the engine does
            self.step.labels(**LABELS, phase=phase)
            self.attn.labels(**LABELS, phase=phase)

    def step_(self, phase: str, step_s: float, attention_s: float | None) -> None:
        """One engine step; attention_s None: a step whose attention was not timed."""
        self.step.labels(**LABELS, phase=phase).observe(step_s)
        if attention_s is not None:
            self.attn.labels(**LABELS, phase=phase).observe(attention_s)

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
    steps = {"prefill": 0, "decode": 0}
    for i in range(40):  # no mixed step in the run
        phase = "prefill" if i % 4 == 0 else "decode"
        s = float(rng.uniform(0.01, 0.05))
        a = s * float(rng.uniform(0.2, 0.6))
        server.step_(phase, s, a)
        step[phase] += s
        attn[phase] += a
        steps[phase] += 1
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
        sum(attn.values()) / sum(step.values()))
    for phase in ("prefill", "decode"):
        split = out["step_time_by_phase"][phase]
        assert split["steps"] == steps[phase]
        assert split["attention_share"] == pytest.approx(attn[phase] / step[phase])
        assert out["attention_share_by_phase"][phase] == split["attention_share"]
        assert split["mean_step_ms"] == pytest.approx(1000 * step[phase] / steps[phase])
        assert split["mean_attention_ms"] == pytest.approx(1000 * attn[phase] / steps[phase])
        assert split["mean_non_attention_ms"] == pytest.approx(
            1000 * (step[phase] - attn[phase]) / steps[phase])
    # The phase that did not occur: zero steps and no numbers.
    assert out["step_time_by_phase"]["mixed"] == {
        "steps": 0, "mean_step_ms": None, "mean_attention_ms": None,
        "mean_non_attention_ms": None, "attention_share": None}
    assert out["attention_share_by_phase"]["mixed"] is None
    overall = out["step_time_all"]
    assert overall["steps"] == 40
    assert overall["mean_attention_ms"] == pytest.approx(1000 * sum(attn.values()) / 40)
    assert overall["attention_share"] == out["attention_share_of_step_time"]
    assert out["step_time_s"] == pytest.approx(sum(step.values()))
    assert out["attention_time_s"] == pytest.approx(sum(attn.values()))
    assert out["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert out["num_preemptions"] == 2
    assert out["prompt_tokens"] == 321 and out["generation_tokens"] == 77
    assert out["kernel_builds"] == 3
    assert out["server_config"]["kv_layout"] == ["hnd"]
    assert out["server_config"]["attention_variant"] == ["softcap:30"]
    assert out["server_config"]["kv_cache_dtype"] == ["fp8_e4m3"]
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


def test_attention_not_observed_on_every_step_gives_no_split() -> None:
    """A server that times only a sample of its steps: its attention sum over all steps'
    time would understate the share, so no attention number is reported for that phase."""
    server = _FakeServer()
    server.step_("decode", 0.04, 0.01)  # before the run
    before = MetricsSnapshot.parse(server.text())
    for i in range(8):
        server.step_("decode", 0.04, 0.01 if i % 4 == 0 else None)
    server.step_("prefill", 0.1, 0.03)
    out = server_metrics_delta(before, MetricsSnapshot.parse(server.text()))
    decode = out["step_time_by_phase"]["decode"]
    assert decode["steps"] == 8 and decode["mean_step_ms"] == pytest.approx(40.0)
    assert decode["attention_share"] is None and decode["mean_attention_ms"] is None
    assert decode["mean_non_attention_ms"] is None
    assert out["step_time_by_phase"]["prefill"]["attention_share"] == pytest.approx(0.3)
    assert out["attention_share_of_step_time"] is None  # one phase unknown: overall unknown
    assert out["attention_time_s"] is None
    assert out["step_time_s"] == pytest.approx(0.42)


def test_hybrid_attention_is_split_by_kind_over_the_run() -> None:
    """A hybrid model's server exports attention_kind_duration_seconds: per kind, the mean
    ms per step over the run and the share of attention, activity before the run excluded;
    the sweep table gets a column for it."""
    from loadtest.report import sweep_markdown

    rng = np.random.default_rng()
    server = _FakeServer()
    kinds = Histogram("attnserve_attention_kind_duration_seconds", "",
                      [*LABELS, "phase", "attention_kind"], registry=server.registry)
    kinds.labels(**LABELS, phase="decode", attention_kind="linear").observe(9.0)  # before
    before = MetricsSnapshot.parse(server.text())
    sums = {"linear": 0.0, "softmax": 0.0}
    for i in range(30):
        phase = "prefill" if i % 5 == 0 else "decode"
        split = {"linear": float(rng.uniform(0.002, 0.004)),
                 "softmax": float(rng.uniform(0.0005, 0.001))}
        server.step_(phase, 0.02, sum(split.values()))
        for kind, value in split.items():
            kinds.labels(**LABELS, phase=phase, attention_kind=kind).observe(value)
            sums[kind] += value
    out = server_metrics_delta(before, MetricsSnapshot.parse(server.text()))
    by_kind = out["attention_by_kind"]
    total = sum(sums.values())
    for kind, value in sums.items():
        assert by_kind[kind]["mean_ms"] == pytest.approx(1000.0 * value / 30)
        assert by_kind[kind]["share_of_attention"] == pytest.approx(value / total)
    table = sweep_markdown([{"config_name": "cache-on", "server_metrics": out}])
    assert "attn ms/step by kind" in table and "linear" in table.splitlines()[-1]


def test_a_scrape_retries_once_on_a_closed_keep_alive_connection() -> None:
    """'Server disconnected without sending a response': the pooled connection was closed by
    the server during a long run; the scrape tries once more instead of losing the run's
    server metrics. Two failures in a row still give None."""
    import asyncio

    import httpx

    from loadtest.server_metrics import scrape

    server = _FakeServer()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) in failing:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, text=server.text())

    async def run() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url="http://test") as client:
            return await scrape(client)

    failing = {1}
    assert isinstance(asyncio.run(run()), MetricsSnapshot) and len(calls) == 2
    calls.clear()
    failing = {1, 2}
    assert asyncio.run(run()) is None and len(calls) == 2
