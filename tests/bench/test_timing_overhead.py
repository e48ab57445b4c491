"""The attention-timing overhead benchmark on the CPU, at a tiny scale: its interleaved runs
really alternate timed and untimed steps, and every figure it reports is computed."""

from __future__ import annotations

import torch

from bench.metrics_timing_overhead import (
    decode_workload,
    interleaved_overhead,
    measure,
    run_interleaved,
    table,
)
from server.engine import EngineConfig, EngineCore
from tests.server.engine_fixtures import smollm2


def _config(batch: int) -> EngineConfig:
    return EngineConfig(device="cpu", dtype="float32", max_num_seqs=batch,
                        max_num_batched_tokens=32, max_model_len=64, kv_cache_tokens=1024,
                        overlap_schedule=False)  # the bench flips modes between steps


def test_interleaved_run_alternates_timed_and_untimed_steps() -> None:
    engine = EngineCore(_config(2), loaded=smollm2())
    steps = run_interleaved(engine, decode_workload(2, 20, 6), "off", "all")
    timed = [s.attention_s is not None for s in steps]
    assert len(steps) >= 6
    assert timed == [i % 2 == 1 for i in range(len(steps))]  # "off" first, then flips
    assert all(s.attention_s > 0 for s in steps if s.attention_s is not None)
    result = interleaved_overhead([steps])
    assert result["decode"]["pairs"] >= 3
    assert result["decode"]["q1_fraction"] <= result["decode"]["median_fraction"] \
        <= result["decode"]["q3_fraction"]


def test_measure_reports_overhead_interleaving_and_agreement_per_phase() -> None:
    torch.manual_seed(0)
    result = measure(_config(2), [2], prompt_len=40, tokens=5, reps=1, loaded=smollm2())
    for name in ("decode-2", "mixed-2"):
        r = result["workloads"][name]
        assert "decode" in r["overhead"] and "decode" in r["interleaved_overhead"]
        assert r["agreement"]["decode"]["matched_steps"] > 0
    assert {"prefill", "decode"} <= set(result["workloads"]["mixed-2"]["overhead"])
    assert "decode-2" in table(result)
