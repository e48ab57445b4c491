"""`--tensor-parallel-size`: the engine split over ranks (worker processes on the CPU, gloo)
gives what the unsplit engine gives, float32, with the prefix cache and chunked prefill on:
the same greedy tokens, and the same logprobs of them and of prompt tokens (the
all-gathered LM head), to float32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.request import SamplingParams
from server.engine import LLM, EngineConfig
from server.engine.tensor_parallel import tensor_parallel_problem
from tests.model.tiny_llama import write_tiny_llama
from tests.server.engine_fixtures import LONG_TEXT, make_llm, smollm2

LOGPROB_TOLERANCE = 2e-4  # float32, sums split over ranks: the order of additions differs
# FP8 K/V: a K or V value that differs in its last float32 bits may round to the next e4m3
# code (steps of 1/8 of its binade), which moves a logprob by about 1e-3
FP8_LOGPROB_TOLERANCE = 2e-2


def _prompts(tok) -> list[list[int]]:
    """Two prompts sharing a 100-token prefix (the second takes it from the cache), one
    unrelated; each longer than a step's token budget (32), so each is chunked."""
    shared = tok.encode(LONG_TEXT * 2)[:100]
    return [shared + tok.encode(" In short:"), shared + tok.encode(" The next layer was"),
            tok.encode("Once upon a time, in a small village by the sea, there lived")[:40]]


def _run(llm: LLM, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    first = llm.generate(prompts[:1], params)  # prompt 0 first, so prompt 1 hits the cache
    rest = llm.generate(prompts[1:], [params, SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=2)])
    return first + rest


def _assert_same(split: list, whole: list, tolerance: float = LOGPROB_TOLERANCE) -> None:
    for a, b in zip(split, whole, strict=True):
        assert a.token_ids == b.token_ids
        assert a.num_cached_tokens == b.num_cached_tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < tolerance
    assert whole[1].num_cached_tokens >= 96  # the shared prefix came from the cache
    assert whole[2].prompt_logprobs is not None and split[2].prompt_logprobs is not None
    for x, y in zip(split[2].prompt_logprobs[1:], whole[2].prompt_logprobs[1:], strict=True):
        assert abs(x.logprob - y.logprob) < tolerance


ENGINE = dict(device="cpu", dtype="float32", kv_cache_tokens=2048, max_num_batched_tokens=32,
              page_size=16, enable_prefix_cache=True)


def test_smollm2_split_over_3_ranks_matches_the_unsplit_engine():
    """9 query heads and 3 KV heads: one KV head and three query heads a rank; the tied
    embedding is vocab-parallel (49152 rows, 16384 a rank)."""
    prompts = _prompts(smollm2().tokenizer)
    whole = _run(make_llm(**ENGINE), prompts)
    with LLM(EngineConfig(**ENGINE, tensor_parallel_size=3)) as llm:
        assert llm.engine.model.config.num_heads == 3
        assert llm.engine.model.config.num_kv_heads == 1
        split = _run(llm, prompts)
    _assert_same(split, whole)


# (kv layout, page size, backend, KV cache dtype): every layout, the Triton kernels (under
# the interpreter), FP8 K/V; each rank stores and attends its own heads
RANK_CASES = [("nhd", 16, "auto", "auto"), ("token", 1, "auto", "auto"),
              ("hnd", 16, "auto", "auto"), ("hnd_x", 16, "auto", "auto"),
              ("nhd", 16, "triton", "auto"), ("hnd", 16, "auto", "fp8")]


@pytest.mark.parametrize("layout,page_size,backend,kv_dtype", RANK_CASES)
def test_tiny_llama_split_over_2_ranks_replicates_its_kv_head(tmp_path: Path, layout, page_size,
                                                               backend, kv_dtype):
    """4 query heads, 1 KV head: both ranks hold the KV head; an untied LM head whose 1003
    rows split with a padding row."""
    folder = write_tiny_llama(tmp_path / "tiny")
    prompts = [[5 + (7 * j) % 900 for j in range(100)] + [11, 12, 13],
               [5 + (7 * j) % 900 for j in range(100)] + [21, 22],
               [40 + j for j in range(37)]]
    flags = dict(ENGINE, model=str(folder), kv_layout=layout, page_size=page_size,
                 attention_backend=backend, kv_cache_dtype=kv_dtype)
    runs = []
    for size in (1, 2):
        with LLM(EngineConfig(**flags, tensor_parallel_size=size)) as llm:
            runs.append(_run(llm, prompts))
            if size == 2:
                assert llm.engine.model.config.num_kv_heads == 1
                assert llm.engine.model.shard.vocab_per_rank == 502
    _assert_same(runs[1], runs[0],
                 FP8_LOGPROB_TOLERANCE if kv_dtype == "fp8" else LOGPROB_TOLERANCE)


def test_models_that_do_not_split_are_refused_before_anything_starts():
    assert "DeepseekV2ForCausalLM models are not split" in tensor_parallel_problem(
        EngineConfig(model="deepseek-v2-lite", device="cpu", tensor_parallel_size=2))
    assert "9 query heads do not divide into 2" in tensor_parallel_problem(
        EngineConfig(device="cpu", tensor_parallel_size=2))
    assert "alibi" in tensor_parallel_problem(
        EngineConfig(device="cpu", tensor_parallel_size=3, attention_variant="alibi"))
    assert tensor_parallel_problem(EngineConfig(device="cpu", tensor_parallel_size=3)) is None
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM models are not split"):
        LLM(EngineConfig(model="deepseek-v2-lite", device="cpu", tensor_parallel_size=2))
