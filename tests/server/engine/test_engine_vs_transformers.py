"""Issue 2 (a, c): greedy tokens equal transformers' generate on the same GGUF weights, for every
KV layout, with and without forced chunked prefill, and under preemption."""

from __future__ import annotations

import functools

import pytest
import torch

from model.hf_reference import load_hf_model
from scheduler.request import SamplingParams
from tests.server.engine_fixtures import make_llm, smollm2, test_prompts

NEW_TOKENS = 32


@functools.cache
def hf_greedy() -> tuple[list[int], ...]:
    hf = load_hf_model(None, "float32")
    eos = sorted(smollm2().tokenizer.eos_token_ids)
    outs = []
    with torch.inference_mode():
        for ids in test_prompts():
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0])
            outs.append(gen[0, len(ids):].tolist())
    return tuple(outs)


def check_against_hf(results: list) -> None:
    want = hf_greedy()
    for i, (r, w) in enumerate(zip(results, want, strict=True)):
        assert r.token_ids == w, f"prompt {i}: ours {r.token_ids} != transformers {w}"


def test_prompt_lengths_cover_5_to_300() -> None:
    lens = [len(p) for p in test_prompts()]
    assert len(lens) >= 8 and min(lens) >= 5 and max(lens) == 300


@pytest.mark.parametrize(("layout", "page_size"), [("token", 1), ("nhd", 16), ("hnd", 16), ("hnd_x", 16)])
@pytest.mark.parametrize("chunked", [False, True])
def test_greedy_matches_transformers(layout: str, page_size: int, chunked: bool) -> None:
    llm = make_llm(kv_layout=layout, page_size=page_size,
                   max_num_batched_tokens=64 if chunked else 4096)
    results = llm.generate(test_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    check_against_hf(results)
    stats = llm.engine.stats()
    assert stats["num_pages_in_use"] == 0


def test_preemption_keeps_outputs_and_frees_every_page() -> None:
    # 640 tokens of KV for 8 requests of up to 332 tokens: decode growth forces preemption
    llm = make_llm(kv_layout="nhd", page_size=16, kv_cache_tokens=640, max_num_batched_tokens=256,
                   enable_prefix_cache=False)
    results = llm.generate(test_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    check_against_hf(results)
    sched = llm.engine.scheduler
    assert sched.stats.num_preemptions_total > 0
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_torch_peer_backends_match_transformers(backend: str) -> None:
    """The SDPA and FlexAttention peers serve the same greedy tokens as transformers (chunked
    prefill, so steps mix decodes and prefill chunks)."""
    llm = make_llm(kv_layout="nhd", page_size=16, max_num_batched_tokens=64,
                   attention_backend=backend)
    assert llm.engine.backend.name == backend
    results = llm.generate(test_prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    check_against_hf(results)
    assert llm.engine.stats()["num_pages_in_use"] == 0
