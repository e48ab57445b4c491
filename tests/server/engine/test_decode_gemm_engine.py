"""`--decode-gemm triton` end to end on the CPU (the skinny GEMM under the interpreter): the
same greedy tokens and logprobs as `--decode-gemm torch`, the kernel serving exactly the
calls of at most 64 rows (decode steps, the LM head of the sampled rows) and torch the
larger prefill chunks; and split over two ranks, the same tokens again."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import model.decode_gemm as decode_gemm  # noqa: E402
from model.skinny_gemm import MAX_ROWS, skinny_linear  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402
from server.engine import LLM, EngineConfig  # noqa: E402
from tests.model.tiny_llama import write_tiny_llama  # noqa: E402

LOGPROB_TOLERANCE = 1e-4  # float32: the kernel sums in another order than torch's matmul


def test_triton_decode_gemm_gives_the_torch_engines_tokens(tmp_path: Path, monkeypatch):
    folder = write_tiny_llama(tmp_path / "tiny", layers=2)
    # a chunk of more than 64 tokens (torch's) and one of fewer (the kernel's)
    prompts = [[5 + (7 * j) % 900 for j in range(90)], [40 + j for j in range(37)],
               [3, 14, 15, 92, 65]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    rows: list[int] = []

    def recording(x, weight, bias=None, config=None):
        rows.append(x.shape[0])
        return skinny_linear(x, weight, bias, config)

    monkeypatch.setattr(decode_gemm, "skinny_linear", recording)
    runs = []
    # the last: split over 2 ranks (worker processes, the interpreter inherited), whose
    # row-parallel o_proj and down_proj keep F.linear
    for mode, ranks in (("torch", 1), ("triton", 1), ("triton", 2)):
        config = EngineConfig(model=str(folder), device="cpu", dtype="float32",
                              kv_cache_tokens=1024, max_num_batched_tokens=80,
                              decode_gemm=mode, tensor_parallel_size=ranks)
        with LLM(config) as llm:
            runs.append(llm.generate(prompts, params))
        if mode == "torch":
            assert rows == []
        if ranks == 1:
            recorded = list(rows)
    torch_run = runs[0]
    for run in runs[1:]:
        for a, b in zip(run, torch_run, strict=True):
            assert a.token_ids == b.token_ids
            for x, y in zip(a.logprobs, b.logprobs, strict=True):
                assert abs(x.logprob - y.logprob) < LOGPROB_TOLERANCE
    # step 1: 80 tokens of prompt 0 (torch); step 2: its last 10 and prompts 1 and 2 (52
    # rows, the kernel; their 3 sampled rows' logits too); then decodes of 3 rows
    assert set(recorded) == {52, 3} and MAX_ROWS >= 52
    assert len(rows) > len(recorded)  # rank 0 of the split engine ran it too


def test_triton_decode_gemm_is_refused_on_a_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLM(EngineConfig(device="cpu", decode_gemm="triton"))
