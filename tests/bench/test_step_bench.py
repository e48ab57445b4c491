"""`attnserve bench step` on the CPU at tiny shapes: every row's parts and floor are there,
consistent, and the engine is left clean between cases."""

from __future__ import annotations

import pytest

from bench.step import build_parser, cases_of, copy_gbps, format_table, measure, weight_bytes
from scheduler.request import SamplingParams
from tests.server.engine.test_overlap_schedule import make_engine


def test_step_rows_on_the_cpu() -> None:
    engine = make_engine(True)
    gbps = copy_gbps(engine.device)
    assert gbps > 0.1
    rows = []
    for batch, context in ((1, 8), (3, 20)):
        sampling = SamplingParams(temperature=0.8, top_p=0.9) if batch > 1 else None
        rows += measure(engine, batch, context, ["overlap", "sequential"], steps=3, warmup=1,
                        gbps=gbps, iters=2, sampling=sampling)
        assert not engine.has_unfinished() and engine.scheduler.num_running == 0
    assert [(r.schedule, r.batch, r.context) for r in rows] == [
        ("overlap", 1, 8), ("sequential", 1, 8), ("overlap", 3, 20), ("sequential", 3, 20)]
    weights = weight_bytes(engine.model)
    mc = engine.loaded.config
    table = mc.vocab_size * mc.hidden_size * 4
    assert weights == sum(p.numel() for p in engine.model.parameters()) * 4 - table
    for r in rows:
        assert r.forward_kind == "eager"
        assert min(r.step_ms, r.forward_ms, r.lm_head_ms, r.sample_ms, r.floor_ms) > 0
        assert r.host_ms == pytest.approx(r.step_ms - r.forward_ms - r.lm_head_ms - r.sample_ms,
                                          abs=2e-3)
        # The last timed step reads every sequence's prompt and the tokens decoded so far:
        # the prefill samples token 1, then 1 warm-up and 3 timed steps; with overlap the
        # first token reaches the host while token 1 is decoded, so one step later.
        per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4
        seq_len = r.context + (5 if r.schedule == "overlap" else 4)
        assert r.weight_bytes == weights
        assert r.kv_bytes == per_token * r.batch * seq_len
        assert r.floor_ms == pytest.approx(1e3 * (weights + r.kv_bytes) / (gbps * 1e9), rel=1e-2)
        assert r.step_over_floor == pytest.approx(r.step_ms / r.floor_ms, rel=1e-2)
    assert "| overlap | 3 | 20 |" in format_table(rows)


def test_cases_and_flags() -> None:
    args = build_parser().parse_args(["--cases", "1x512,64x4096", "--schedules", "overlap"])
    assert cases_of(args) == [(1, 512), (64, 4096)] and args.schedules == ["overlap"]
    args = build_parser().parse_args(["--batches", "1,16", "--context-lens", "512,4096"])
    assert cases_of(args) == [(1, 512), (1, 4096), (16, 512), (16, 4096)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--schedules", "fast"])


def test_step_rows_of_a_model_split_over_two_ranks(tmp_path) -> None:
    """The same row at --tensor-parallel-size 2 (gloo): one rank's bytes, and a floor that
    adds the step's all-reduces, timed on both ranks (each timed part runs on every rank)."""
    from server.engine import EngineConfig, EngineCore
    from tests.model.tiny_llama import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "tiny")
    engine = EngineCore(EngineConfig(model=str(folder), device="cpu", dtype="float32",
                                     kv_cache_tokens=1024, tensor_parallel_size=2))
    try:
        gbps = copy_gbps(engine.device)
        (row,) = measure(engine, 2, 12, ["overlap"], steps=3, warmup=1, gbps=gbps, iters=2)
        assert not engine.has_unfinished()
        local = engine.model.config
        assert local.num_kv_heads == 1 and local.num_heads == 2
        table = engine.model.embed_tokens.weight  # rank 0's rows of it: not read by a step
        assert row.weight_bytes == weight_bytes(engine.model) == \
            sum(p.numel() for p in engine.model.parameters()) * 4 - table.numel() * 4
        assert row.kv_bytes == 2 * local.num_layers * 1 * local.head_dim * 4 * 2 * (12 + 5)
        assert row.tp_size == 2 and row.all_reduce_ms > 0
        assert row.comm_ms == pytest.approx((2 * local.num_layers + 1) * row.all_reduce_ms,
                                            rel=1e-3)
        assert row.floor_ms == pytest.approx(
            1e3 * (row.weight_bytes + row.kv_bytes) / (gbps * 1e9) + row.comm_ms, rel=1e-2)
        assert min(row.forward_ms, row.lm_head_ms, row.sample_ms) > 0
        # the ranks are still in step after the timing calls they all made
        outputs = []
        engine.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3),
                           sink=outputs.append)
        while engine.has_unfinished():
            engine.step()
        assert outputs[-1].finished and outputs[-1].error is None
        assert outputs[-1].num_output_tokens == 3
    finally:
        engine.shutdown()
