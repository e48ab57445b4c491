"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, per-request seeds.

Rows without a seed are filtered and sampled together in one vectorised pass. A row with a
seed is filtered and sampled on its own, with its own generator, so its draw depends only on
its logits and its generator's state: the same seed gives the same tokens whatever else is
in the batch. Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which
needs one random draw per vocabulary entry and no cumulative-sum search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.request import SamplingParams

_MIN_EXPONENTIAL = 1e-10  # guards p / E against E == 0


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (one per seeded request)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32: log-probability of the chosen token
    top_logprobs: torch.Tensor | None = None  # [N, K] float32, K = max requested over the batch
    top_token_ids: torch.Tensor | None = None  # [N, K] int64


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [n, V] after temperature, top-k, top-p and min-p (excluded tokens: 0)."""
    dev = logits.device
    V = logits.shape[-1]
    scaled = logits / _column([p.temperature for p in params], dev)
    top_ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < V for k in top_ks) or any(tp < 1.0 for tp in top_ps):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=dev)[None, :]
        drop = rank >= torch.tensor(top_ks, device=dev)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if any(tp < 1.0 for tp in top_ps):
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the
            # mass before it already reaches top_p (the first token always stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_p = mass_before >= _column(top_ps, dev)
            drop_p[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    probs = scaled.softmax(dim=-1)
    min_ps = [p.min_p for p in params]
    if any(mp > 0.0 for mp in min_ps):
        threshold = probs.amax(dim=-1, keepdim=True) * _column(min_ps, dev)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise.clamp_min_(_MIN_EXPONENTIAL)).argmax(dim=-1)


class Sampler:
    """logits [N, V] float32 + per-row SamplingParams (+ generator or None) -> SamplerOutput."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None] | None = None,
    ) -> SamplerOutput:
        N = logits.shape[0]
        if len(params) != N:
            raise ValueError(f"{N} logits rows but {len(params)} sampling params")
        gens = generators if generators is not None else [None] * N
        dev = logits.device
        logits = logits.float()
        tokens = logits.argmax(dim=-1)  # greedy rows keep this
        unseeded = [i for i, p in enumerate(params) if not p.greedy and gens[i] is None]
        seeded = [i for i, p in enumerate(params) if not p.greedy and gens[i] is not None]
        if unseeded:
            rows = torch.tensor(unseeded, device=dev)
            probs = filtered_probs(logits[rows], [params[i] for i in unseeded])
            tokens[rows] = _race(probs, None)
        for i in seeded:
            probs = filtered_probs(logits[i : i + 1], [params[i]])
            tokens[i] = _race(probs, gens[i])[0]
        out = SamplerOutput(token_ids=tokens)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            # Log-probabilities of the model's distribution, before any sampling transform.
            logp = logits.log_softmax(dim=-1)
            out.logprobs = logp.gather(1, tokens[:, None])[:, 0]
            k = max(wanted)
            if k > 0:
                out.top_logprobs, out.top_token_ids = logp.topk(k, dim=-1)
        return out
