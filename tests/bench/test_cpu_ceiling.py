"""`bench.cpu_ceiling` on a tiny Llama: the recorded schedule accounts for every prompt and
output token, the padded schedule is the forwards transformers really runs, the replay runs
exactly the engine's weight GEMMs, and the record holds what docs/cpu-path.md reports."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bench.cpu_ceiling import (
    GemmReplay,
    ModelWeights,
    PhaseTimes,
    Round,
    ScheduleStep,
    ceiling,
    main,
    padded_schedule,
)
from bench.offline import random_prompts, sample_lengths, transformers_throughput
from tests.model.tiny_llama import write_tiny_llama

NUM_PROMPTS, BATCH = 6, 4
FLAGS = ["--num-prompts", str(NUM_PROMPTS), "--input-len", "12", "--output-len", "5",
         "--range-ratio", "0.5", "--max-num-seqs", str(BATCH),
         "--max-num-batched-tokens", "32", "--device", "cpu", "--dtype", "float32",
         "--kv-cache-tokens", "1024", "--page-size", "4", "--repeats", "2"]


def tiny_llama(folder: Path, **shapes: int) -> Path:
    """The tests' tiny Llama, with the `model_type` transformers' loader wants."""
    write_tiny_llama(folder, **shapes)
    config = json.loads((folder / "config.json").read_text()) | {"model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def workload() -> tuple[list[int], list[int], list[list[int]]]:
    rng = random.Random(0)  # bench_seed 0, drawn as the benchmark draws them
    in_lens = sample_lengths(rng, NUM_PROMPTS, 12, 0.5)
    out_lens = sample_lengths(rng, NUM_PROMPTS, 5, 0.5)
    return in_lens, out_lens, random_prompts(rng, in_lens, 1003 // 4, 1003)


def test_padded_schedule_is_what_transformers_runs(tmp_path) -> None:
    from model.hf_reference import load_hf_model

    hf = load_hf_model(str(tiny_llama(tmp_path / "tiny")))
    in_lens, out_lens, prompts = workload()
    seen: list[ScheduleStep] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"]
        keep = kwargs.get("logits_to_keep", 0)  # 0: every row's logits
        per_seq = ids.shape[1] if keep == 0 else min(keep, ids.shape[1])
        prefill = ids.shape[1] > 1
        seen.append(ScheduleStep(ids.numel() if prefill else 0,
                                 0 if prefill else ids.numel(), ids.shape[0] * per_seq))

    hook = hf.register_forward_pre_hook(record, with_kwargs=True)
    try:
        transformers_throughput(hf, prompts, out_lens, BATCH)
    finally:
        hook.remove()
    assert seen == padded_schedule(in_lens, out_lens, BATCH)
    assert len(seen) == max(out_lens[:BATCH]) + max(out_lens[BATCH:])


def test_replay_runs_the_engines_weight_gemms(tmp_path, monkeypatch) -> None:
    from server.engine import LLM, EngineConfig

    folder = tiny_llama(tmp_path / "tiny", hidden=32, intermediate=48, heads=2)
    llm = LLM(EngineConfig(model=str(folder), device="cpu", dtype="float32",
                           kv_cache_tokens=256, log_stats=False))
    weights = ModelWeights.of(llm.engine.model)
    mc = llm.engine.model.config
    schedule = [ScheduleStep(7, 2, 3), ScheduleStep(0, 5, 5), ScheduleStep(4, 0, 0)]
    # independent count: every 2-D parameter but the embedding table and the LM head is a
    # projection each row goes through once; the LM head runs on the logit rows
    per_row = sum(p.numel() for n, p in llm.engine.model.named_parameters()
                  if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    rows = sum(s.rows for s in schedule)
    logits = sum(s.logit_rows for s in schedule)
    assert weights.flops(schedule) == 2 * rows * per_row + 2 * logits * mc.vocab_size * 32
    ran: list[tuple[int, int, int]] = []
    real_mm = torch.mm

    def mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        assert any(b.data_ptr() == w.data_ptr() for w in
                   [weights.head] + [w for layer in weights.layers for w in layer.values()])
        ran.append((a.shape[0], a.shape[1], b.shape[1]))
        return real_mm(a, b, out=out)

    with pytest.raises(ValueError, match="exceeds"):
        GemmReplay(weights, 8, 5).step(schedule[0])
    replay = GemmReplay(weights, 9, 5)
    monkeypatch.setattr(torch, "mm", mm)
    times = replay.time(schedule)
    assert len(times) == 3 and min(times) > 0
    assert ran == [shape for step in schedule for shape in weights.shapes(step)]
    assert len(ran) == 4 * mc.num_layers * 3 + 2  # the third step samples nothing


def test_ceiling_arithmetic() -> None:
    def round_(ours: float, gemm: float, theirs: float) -> Round:
        return Round(ours, ours - 0.1, PhaseTimes(1.0, ours - 1.1), gemm,
                     PhaseTimes(0.5, gemm - 0.5), theirs, 9.0, 1.0)

    r = ceiling([round_(10.0, 6.0, 16.0), round_(12.0, 5.0, 30.0), round_(9.0, 7.0, 1.0)])
    # medians: ours 10, GEMMs 6, theirs 16; 2x needs 8 s, so 2 of the 4 s of overhead go
    assert r["ratio"] == pytest.approx(1.6) and r["ceiling_ratio"] == pytest.approx(16 / 6)
    assert r["overhead_to_remove_s"] == pytest.approx(2.0)
    assert r["overhead_to_remove_share"] == pytest.approx(0.5)
    assert r["attnserve_outside_steps_s"] == pytest.approx(0.1)
    assert ceiling([round_(10.0, 6.0, 30.0)])["overhead_to_remove_s"] == 0.0


def test_end_to_end_record(tmp_path) -> None:
    folder = tiny_llama(tmp_path / "tiny")
    out = tmp_path / "ceiling.json"
    assert main(FLAGS + ["--model", str(folder), "--json-out", str(out)]) == 0
    record = json.loads(out.read_text())
    in_lens, out_lens, _ = workload()
    ours = record["attnserve_schedule"]
    # cold cache: every prompt token is computed once; each request's first token comes
    # from its last prefill chunk, the others from decode rows; one logit row per token
    assert ours["prefill_rows"] == sum(in_lens) == record["workload"]["prompt_tokens"]
    assert ours["decode_rows"] == sum(out_lens) - NUM_PROMPTS
    assert ours["logit_rows"] == sum(out_lens)
    assert ours["steps_with_prefill"] >= sum(in_lens) / 32  # the 32-token budget chunks them
    assert all(p + d <= 32 for p, d, _ in record["attnserve_steps"])
    theirs = record["transformers_schedule"]
    assert theirs["prefill_rows"] == BATCH * max(in_lens[:BATCH]) + 2 * max(in_lens[BATCH:])
    assert len(record["rounds"]) == 2
    r = record["result"]
    assert r["ceiling_ratio"] == pytest.approx(r["transformers_real_s"] / r["attnserve_gemm_s"])
    assert 0 < r["attnserve_gemm_s"] < r["attnserve_real_s"]
    for rnd in record["rounds"]:
        assert rnd["attnserve_steps_s"] <= rnd["attnserve_real_s"]
        phases = rnd["attnserve_gemm_phases"]
        assert phases["prefill_or_mixed_s"] + phases["decode_only_s"] == \
            pytest.approx(rnd["attnserve_gemm_s"])
    assert len(record["load_avg_before"]) == 3 and record["rounds_done"] == 2
