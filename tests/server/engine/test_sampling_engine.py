"""Issue 20 (1): the engine's side of the sampling parameters on the real SmolLM2 (CPU).

Penalties and logit_bias: greedy tokens equal the argmax of transformers' logits processed
by vLLM's definitions in float64 (the engine hands the sampler the right token history);
min_tokens holds EOS and stop ids back; n samples compute their shared prompt once (the
prefill-token counter) and, seeded, are reproducible and distinct; best_of keeps the
candidates with the highest cumulative logprob."""

from __future__ import annotations

import functools

import pytest
import torch

from model.hf_reference import load_hf_model
from model.sampler import TokenHistory
from scheduler.request import SamplingParams
from tests.model.test_sampler import _reference_processed
from tests.server.engine_fixtures import LONG_TEXT, make_llm, smollm2

pytestmark = pytest.mark.timeout(600)


@functools.cache
def _hf() -> torch.nn.Module:
    return load_hf_model(None, "float32")


def _prompt() -> list[int]:
    tok = smollm2().tokenizer
    return tok.apply_chat_template([{"role": "user", "content": "Repeat: the cat, the cat."}])


def test_penalties_and_bias_follow_vllms_definitions_on_the_models_logits() -> None:
    prompt = _prompt()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=1.4, frequency_penalty=0.8,
                            presence_penalty=0.5, logit_bias={1042: 3.0, 28: -5.0})
    llm = make_llm()
    out = llm.generate([prompt], params)[0].token_ids
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                  ignore_eos=True))[0].token_ids
    assert out != plain  # the processing changed the text
    with torch.inference_mode():
        logits = _hf()(torch.tensor([prompt + out])).logits[0].float()
    for t, token in enumerate(out):
        row = logits[len(prompt) - 1 + t]
        ref = _reference_processed(row, params, TokenHistory(prompt, out[:t]))
        top2 = ref.topk(2).values
        if top2[0] - top2[1] < 1e-3:
            continue  # a float32 near-tie between the two models: either token is right
        assert token == int(ref.argmax()), f"step {t}: engine {token}, reference {ref.argmax()}"


@pytest.mark.parametrize("min_tokens", [0, 4])
def test_min_tokens_holds_eos_and_stop_ids_back(min_tokens: int) -> None:
    llm = make_llm()
    eos = min(smollm2().tokenizer.eos_token_ids)
    forced_eos = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=min_tokens,
                                logit_bias={eos: 100.0})
    r = llm.generate([_prompt()], forced_eos)[0]
    assert r.token_ids[-1] == eos and r.finish_reason == "stop"
    assert len(r.token_ids) == min_tokens + 1
    assert eos not in r.token_ids[:-1]
    stop_id = 13  # any token: the bias makes it the only choice once allowed
    forced_stop = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=min_tokens,
                                 stop_token_ids=[stop_id], logit_bias={stop_id: 100.0})
    r = llm.generate([_prompt()], forced_stop)[0]
    assert r.token_ids == r.token_ids[:min_tokens] + [stop_id]
    assert stop_id not in r.token_ids[:-1] and r.finish_reason == "stop"


def test_n_samples_compute_the_prompt_once_and_seeded_samples_repeat() -> None:
    prompt = smollm2().tokenizer.encode(LONG_TEXT)[:50]
    assert len(prompt) == 50
    params = SamplingParams(temperature=1.8, max_tokens=6, n=3, seed=11, ignore_eos=True)
    llm = make_llm(page_size=16)
    first = llm.generate([prompt], params)
    # the first sample computes all 50 prompt tokens; the others take the 48 of its whole
    # pages from the cache and compute only the last 2
    assert llm.engine.prefill_tokens_computed == 50 + 2 * 2
    assert len(first) == 3 and all(len(c.token_ids) == 6 for c in first)
    assert [c.num_cached_tokens for c in first] == [0, 48, 48]
    assert len({tuple(c.token_ids) for c in first}) == 3  # distinct samples
    again = make_llm(page_size=16).generate([prompt], params)
    assert [c.token_ids for c in again] == [c.token_ids for c in first]


def test_best_of_returns_the_most_likely_candidates() -> None:
    prompt = _prompt()
    common = dict(temperature=1.5, max_tokens=4, seed=5, ignore_eos=True, logprobs=0)
    candidates = make_llm().generate([prompt], SamplingParams(n=4, **common))  # type: ignore[arg-type]
    best = make_llm().generate([prompt], SamplingParams(n=2, best_of=4, **common))  # type: ignore[arg-type]
    ranked = sorted(candidates, key=lambda c: -sum(lp.logprob for lp in c.logprobs))
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    # without logprobs asked for, the ranking still works and none are returned
    common["logprobs"] = None
    quiet = make_llm().generate([prompt], SamplingParams(n=2, best_of=4, **common))  # type: ignore[arg-type]
    assert [c.token_ids for c in quiet] == [c.token_ids for c in best]
    assert all(not c.logprobs for c in quiet)


@pytest.mark.parametrize("chunk", [4096, 24])
def test_prompt_logprobs_are_transformers_and_ignore_the_prefix_cache(chunk: int) -> None:
    prompt = _prompt()
    llm = make_llm(max_num_batched_tokens=chunk)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))  # fills the cache
    r = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2,
                                              prompt_logprobs=3))[0]
    assert r.num_cached_tokens == 0
    lps = r.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt) and lps[0] is None
    with torch.inference_mode():
        ref = _hf()(torch.tensor([prompt])).logits[0].double().log_softmax(dim=-1)
    for pos in range(1, len(prompt)):
        lp = lps[pos]
        assert lp is not None and lp.token_id == prompt[pos]
        assert abs(lp.logprob - float(ref[pos - 1, prompt[pos]])) < 1e-3, pos
        top = ref[pos - 1].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist(), pos


def test_engine_seed_makes_unseeded_sampling_reproducible() -> None:
    params = SamplingParams(temperature=1.8, max_tokens=6, ignore_eos=True)

    def run(seed: int) -> list[int]:
        return make_llm(seed=seed).generate([_prompt()], params)[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
