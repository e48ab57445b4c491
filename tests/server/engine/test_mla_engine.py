"""Tiny random DeepSeek-V2 and V3 models served by the engine over the paged latent cache
give transformers' greedy tokens (float32, CPU): prefix cache on and off, chunked prefill on
and off, pages of 1 and 16 tokens, and under preemption."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the triton MLA backend on the CPU

import functools  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvcache.latent_pool import LatentPool  # noqa: E402
from model.loader import LoadedModel, embedded_tokenizer, load_model  # noqa: E402
from scheduler.request import SamplingParams  # noqa: E402
from server.engine import LLM, EngineConfig, EngineCore  # noqa: E402
from tests.model.deepseek_tiny import VOCAB, save_tiny  # noqa: E402

NEW_TOKENS = 12
SEED = 20261206


@functools.cache
def tiny(variant: str) -> tuple[str, torch.nn.Module]:
    folder = Path(tempfile.mkdtemp(prefix=f"attnserve-{variant}-"))
    hf = save_tiny(variant, folder, SEED)
    return str(folder), hf


@functools.cache
def prompts() -> list[list[int]]:
    """Ragged prompts, three of them sharing a 48-token prefix (prefix-cache hits)."""
    rng = random.Random(SEED)
    shared = [rng.randrange(3, VOCAB) for _ in range(48)]
    own = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 17, 40, 70)]
    return own + [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 9, 20)]


@functools.cache
def hf_greedy(variant: str) -> tuple[tuple[int, ...], ...]:
    _, hf = tiny(variant)
    eos = sorted(embedded_tokenizer().eos_token_ids)
    outs = []
    with torch.inference_mode():
        for ids in prompts():
            gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[0])
            outs.append(tuple(gen[0, len(ids):].tolist()))
    return tuple(outs)


@functools.cache
def loaded_model(variant: str) -> LoadedModel:
    """Loaded once per variant: every engine builds its own pool, the weights are shared."""
    folder, _ = tiny(variant)
    loaded = load_model(folder, torch.float32, torch.device("cpu"), with_tokenizer=False)
    loaded.tokenizer = embedded_tokenizer()
    return loaded


def make_llm(variant: str, **overrides: object) -> LLM:
    folder, _ = tiny(variant)
    config = EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_tokens=2048)
    for k, v in overrides.items():
        setattr(config, k, v)
    llm = LLM.__new__(LLM)
    llm.engine = EngineCore(config, loaded=loaded_model(variant))
    llm.tokenizer = llm.engine.tokenizer
    return llm


def run_and_check(llm: LLM, variant: str) -> None:
    results = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for i, (r, want) in enumerate(zip(results, hf_greedy(variant), strict=True)):
        assert tuple(r.token_ids) == want, f"prompt {i}: ours {r.token_ids} != transformers {want}"
    assert llm.engine.stats()["num_pages_in_use"] == 0


@pytest.mark.parametrize("variant", ["v2-lite", "v3"])
@pytest.mark.parametrize(("layout", "page_size"), [("token", 1), ("nhd", 16)])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_greedy_matches_transformers(variant: str, layout: str, page_size: int, chunked: bool,
                                     prefix_cache: bool) -> None:
    llm = make_llm(variant, kv_layout=layout, page_size=page_size,
                   max_num_batched_tokens=32 if chunked else 4096,
                   enable_prefix_cache=prefix_cache)
    pool = llm.engine.pool
    assert isinstance(pool, LatentPool)
    assert pool.caches[0].shape[1:] == (page_size, 32 + 16)  # kv_lora_rank + rope dim
    run_and_check(llm, variant)
    hits = llm.engine.stats()["prefix_cache_hit_tokens"]
    assert (hits > 0) == prefix_cache


@pytest.mark.parametrize(("variant", "backends"), [
    ("v3", {"attention_backend": "triton", "max_num_batched_tokens": 32}),
    ("v2-lite", {"prefill_backend": "reference", "decode_backend": "triton",
                 "kv_layout": "token", "page_size": 1}),
])
def test_triton_mla_backend_serves_the_same_tokens(variant: str, backends: dict) -> None:
    """The Triton MLA kernels (fused rotary store, decode, extend; and as the decode half of
    a hybrid) give transformers' greedy tokens too (under the interpreter)."""
    llm = make_llm(variant, **backends)
    assert llm.engine.backend.name in ("triton", "reference+triton")
    run_and_check(llm, variant)


def test_preemption_over_the_latent_pool() -> None:
    """Six short prompts decoding 40 tokens each in a pool of six 16-token pages: decode
    growth preempts; the tokens equal those of a pool that never runs short."""
    rng = random.Random(SEED)
    short = [[rng.randrange(3, VOCAB) for _ in range(10)] for _ in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = make_llm("v3", kv_layout="nhd", page_size=16, enable_prefix_cache=False)
    want = [r.token_ids for r in roomy.generate(short, params)]
    tight = make_llm("v3", kv_layout="nhd", page_size=16, kv_cache_tokens=96,
                     enable_prefix_cache=False)
    got = [r.token_ids for r in tight.generate(short, params)]
    assert tight.engine.scheduler.stats.num_preemptions_total > 0
    assert roomy.engine.scheduler.stats.num_preemptions_total == 0
    assert got == want
    assert tight.engine.allocator.num_free == tight.engine.allocator.num_total


def test_mla_model_refuses_layouts_and_variants_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match="does not apply to an MLA latent cache"):
        make_llm("v2-lite", kv_layout="hnd")
    with pytest.raises(ValueError, match="softmax attention only"):
        make_llm("v2-lite", attention_variant="softcap:30")
