"""Sampler: greedy, filters never pick excluded tokens, distribution, per-request seeds, and
logits processing (min_tokens, logit_bias, penalties) against a float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

from model.sampler import Sampler, TokenHistory, make_generator, process_logits
from scheduler.request import SamplingParams


def _logits(n: int, v: int, seed: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
    return torch.randn(n, v, generator=gen) * 3


def _allowed_set(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Independent per-row reference of the tokens a filter keeps (plain Python loops)."""
    probs = torch.softmax(row.double() / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if p.top_k > 0:
        order = order[: p.top_k]
    kept_mass = sum(probs[i] for i in order)
    kept: list[int] = []
    mass = 0.0
    for i in order:
        kept.append(i)
        mass += probs[i] / kept_mass
        if mass >= p.top_p - 1e-9:
            break
    top = max(probs[i] for i in kept)
    return {i for i in kept if probs[i] >= p.min_p * top - 1e-12}


def test_greedy_is_argmax_even_with_a_generator():
    logits = _logits(16, 1000)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3) for _ in range(16)]
    gens = [make_generator(i, "cpu") if i % 2 else None for i in range(16)]
    out = Sampler()(logits, params, gens)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_filters_never_pick_excluded_tokens():
    rng = random.Random()
    n, v = 300, 40
    logits = _logits(n, v)
    params = [
        SamplingParams(
            temperature=rng.choice([0.5, 1.0, 1.7]),
            top_k=rng.choice([0, 1, 3, 10]),
            top_p=rng.choice([1.0, 0.9, 0.5, 0.1]),
            min_p=rng.choice([0.0, 0.05, 0.3]),
        )
        for _ in range(n)
    ]
    gens = [make_generator(rng.randrange(2**31), "cpu") if i % 3 == 0 else None
            for i in range(n)]
    out = Sampler()(logits, params, gens)
    for i in range(n):
        allowed = _allowed_set(logits[i], params[i])
        assert int(out.token_ids[i]) in allowed, (i, params[i], allowed)


def test_filters_exclude_strictly():
    # One dominant token: top_k=1, tiny top_p and min_p=0.5 must all return it every time.
    logits = torch.zeros(64, 10)
    logits[:, 7] = 4.0
    for p in (SamplingParams(top_k=1), SamplingParams(top_p=0.05), SamplingParams(min_p=0.5)):
        out = Sampler()(logits, [p] * 64)
        assert (out.token_ids == 7).all()


def test_unfiltered_sampling_follows_softmax():
    n = 20000
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    logits = row.expand(n, 4).clone()
    out = Sampler()(logits, [SamplingParams(temperature=0.8)] * n)
    freq = torch.bincount(out.token_ids, minlength=4).double() / n
    expected = torch.softmax(row.double() / 0.8, dim=-1)
    # 5 standard errors of a binomial proportion
    bound = 5 * torch.sqrt(expected * (1 - expected) / n)
    assert ((freq - expected).abs() < bound).all(), (freq, expected)


def test_seeded_rows_reproducible_whatever_the_batch():
    v = 500
    target = _logits(3, v)  # the seeded request's logits over 3 steps
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234)

    def run(batch_size: int, position: int) -> list[int]:
        gen = make_generator(1234, "cpu")
        tokens = []
        for step in range(3):
            logits = _logits(batch_size, v)
            logits[position] = target[step]
            params = [SamplingParams(temperature=1.3, top_k=7) for _ in range(batch_size)]
            params[position] = p
            gens: list[torch.Generator | None] = [None] * batch_size
            gens[position] = gen
            if batch_size > 2:  # another seeded request alongside
                other = (position + 1) % batch_size
                gens[other] = make_generator(99, "cpu")
            tokens.append(int(Sampler()(logits, params, gens).token_ids[position]))
        return tokens

    alone = run(1, 0)
    assert run(8, 5) == alone
    assert run(3, 0) == alone
    # Different seeds draw different streams (over 3 draws from ~50 tokens, a coincidence
    # across 5 other seeds is negligible).
    others = set()
    for s in range(5):
        gen = make_generator(s, "cpu")
        others.add(tuple(int(Sampler()(target[i : i + 1], [p], [gen]).token_ids[0])
                         for i in range(3)))
    assert len(others) > 1


def test_logprobs_of_chosen_and_top():
    logits = _logits(5, 100)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(logprobs=0),
              SamplingParams(), SamplingParams(temperature=0.0, logprobs=5),
              SamplingParams(top_k=2)]
    out = Sampler()(logits, params)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs is not None and out.top_logprobs is not None
    chosen = ref.gather(1, out.token_ids[:, None])[:, 0]
    assert torch.allclose(out.logprobs.double(), chosen, atol=1e-5)
    assert out.top_logprobs.shape == (5, 5)
    top_ref, idx_ref = ref.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, idx_ref)
    assert torch.allclose(out.top_logprobs.double(), top_ref, atol=1e-5)


def test_no_logprobs_requested():
    out = Sampler()(_logits(2, 10), [SamplingParams(), SamplingParams(temperature=0.0)])
    assert out.logprobs is None and out.top_logprobs is None


# ---- logits processing: min_tokens, logit_bias, penalties (vLLM's definitions) -------------


def _reference_processed(row: torch.Tensor, p: SamplingParams, h: TokenHistory) -> torch.Tensor:
    """vLLM's definitions, token by token in float64 (plain Python, no vectorisation)."""
    out = row.double().clone()
    seen = set(h.prompt_token_ids) | set(h.output_token_ids)
    for t in range(out.shape[0]):
        value = float(out[t])
        if t in h.banned_token_ids:
            value = float("-inf")
        value += (p.logit_bias or {}).get(t, 0.0)
        if t in seen and p.repetition_penalty != 1.0:
            value = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        count = list(h.output_token_ids).count(t)
        value -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        out[t] = value
    return out


def _random_case(rng: random.Random, v: int) -> tuple[SamplingParams, TokenHistory]:
    prompt = [rng.randrange(v) for _ in range(rng.randrange(1, 30))]
    output = [rng.randrange(v) for _ in range(rng.randrange(0, 25))]
    bias = {rng.randrange(v): rng.uniform(-100, 100) for _ in range(rng.randrange(0, 4))}
    p = SamplingParams(
        temperature=0.0,
        presence_penalty=rng.choice([0.0, 0.5, -1.5, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.7, -0.3, 2.0]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8, 2.0]),
        logit_bias=bias or None, min_tokens=rng.choice([0, 0, 5]), max_tokens=10,
    )
    banned = [rng.randrange(v)] if p.min_tokens and len(output) < p.min_tokens else []
    return p, TokenHistory(prompt, output, banned)


def test_processed_logits_match_a_float64_reference():
    rng = random.Random(7)
    n, v = 40, 64
    logits = _logits(n, v, seed=3)
    cases = [_random_case(rng, v) for _ in range(n)]
    cases[0] = (SamplingParams(temperature=0.0), TokenHistory([1, 2], [3]))  # no processing
    params = [c[0] for c in cases]
    histories = [c[1] for c in cases]
    processed = process_logits(logits, params, histories)
    assert torch.equal(processed[0], logits[0])
    for i in range(n):
        ref = _reference_processed(logits[i], params[i], histories[i])
        assert torch.allclose(processed[i].double(), ref, atol=1e-4, rtol=1e-5), (i, params[i])
    # greedy sampling takes the argmax of the processed logits, not of the raw ones
    out = Sampler()(logits, params, None, histories)
    expected = torch.stack([_reference_processed(logits[i], params[i], histories[i])
                            for i in range(n)]).argmax(dim=-1)
    assert torch.equal(out.token_ids, expected)
    assert not torch.equal(out.token_ids, logits.argmax(dim=-1))  # processing mattered


def test_each_processing_moves_the_greedy_token_as_defined():
    # token 0 leads; each transform alone must hand the win to token 1 (or keep it)
    row = torch.tensor([[3.0, 2.5, -1.0, 0.5]])
    hist = TokenHistory(prompt_token_ids=[2], output_token_ids=[0, 0])
    cases = [
        (SamplingParams(temperature=0.0), 0),
        (SamplingParams(temperature=0.0, logit_bias={1: 1.0}), 1),
        (SamplingParams(temperature=0.0, presence_penalty=0.6), 1),  # 3 - 0.6 < 2.5
        (SamplingParams(temperature=0.0, presence_penalty=0.4), 0),
        (SamplingParams(temperature=0.0, frequency_penalty=0.3), 1),  # 3 - 2 x 0.3 < 2.5
        (SamplingParams(temperature=0.0, frequency_penalty=0.2), 0),
        (SamplingParams(temperature=0.0, repetition_penalty=1.25), 1),  # 3 / 1.25 < 2.5
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), 0),
    ]
    for p, expected in cases:
        assert int(Sampler()(row, [p], None, [hist]).token_ids[0]) == expected, p
    # repetition multiplies a negative logit: token 2 (in the prompt) sinks further
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert process_logits(row, [p], [hist])[0, 2] == -2.0


def test_min_tokens_bans_until_reached_and_sampling_respects_the_ban():
    logits = torch.zeros(200, 6)
    logits[:, 5] = 50.0  # EOS would always win
    p = SamplingParams(temperature=1.0, min_tokens=3)
    banned = TokenHistory([1], [1, 2], banned_token_ids=[5])
    out = Sampler()(logits, [p] * 200, None, [banned] * 200)
    assert (out.token_ids != 5).all()
    free = TokenHistory([1], [1, 2, 3])
    out = Sampler()(logits, [p] * 200, None, [free] * 200)
    assert (out.token_ids == 5).all()


def test_logprobs_stay_the_models_under_processing():
    logits = _logits(3, 50, seed=1)
    p = SamplingParams(temperature=0.0, logprobs=2, presence_penalty=2.0, logit_bias={7: 30.0})
    hist = TokenHistory([1], [int(logits[0].argmax())])
    out = Sampler()(logits, [p] * 3, None, [hist] * 3)
    assert (out.token_ids == 7).all()
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs is not None
    assert torch.allclose(out.logprobs.double(), ref[:, 7], atol=1e-5)


def test_penalties_without_history_are_refused():
    with pytest.raises(ValueError, match="history"):
        Sampler()(_logits(1, 10), [SamplingParams(presence_penalty=1.0)])
