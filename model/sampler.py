"""Token sampling on device: logits processing (min_tokens, logit_bias, repetition /
frequency / presence penalties), greedy, temperature, top-k, top-p, min-p, per-request seeds.

Logits processing follows vLLM's definitions (scheduler/request.py SamplingParams) and runs
only on the rows whose parameters ask for it, vectorised over them: the generated-token
counts are one [rows, vocab] tensor built by a scatter of the rows' token lists, so a batch
without penalties does no extra work beyond one check of its parameters.

Rows without a seed are filtered and sampled together in one vectorised pass. A row with a
seed is filtered and sampled on its own, with its own generator, so its draw depends only on
its logits and its generator's state: the same seed gives the same tokens whatever else is
in the batch. Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which
needs one random draw per vocabulary entry and no cumulative-sum search.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
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
class TokenHistory:
    """What the logits processing of one row reads: its request's prompt and generated
    tokens, and the tokens it may not sample yet (EOS and stop ids under min_tokens)."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int] = ()


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None = None  # [N] float32: log-probability of the chosen token
    top_logprobs: torch.Tensor | None = None  # [N, K] float32, K = max requested over the batch
    top_token_ids: torch.Tensor | None = None  # [N, K] int64


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device` without waiting for the work queued there: through pinned
    memory, non-blocking (`torch.tensor(values, device=cuda)` synchronises the stream)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]


def _indices(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.int64, device)


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
        drop = rank >= _indices(top_ks, dev)[:, None]
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


def _flat_index(lists: list[Sequence[int]], width: int, dev: torch.device) -> torch.Tensor:
    """Indices into a flattened [len(lists), width] tensor of every (row, token) pair."""
    tokens = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.int64)
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(lists), dtype=torch.int64) * width, lengths)
    flat = rows + tokens
    return (flat.pin_memory() if dev.type == "cuda" else flat).to(dev, non_blocking=True)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[TokenHistory]) -> torch.Tensor:
    """Repetition, frequency and presence penalties on rows [n, V] (a new tensor)."""
    n, V = logits.shape
    dev = logits.device
    counts = torch.zeros(n * V, dtype=logits.dtype, device=dev)
    outputs = [h.output_token_ids for h in histories]
    if any(outputs):
        ones = torch.ones(sum(len(x) for x in outputs), dtype=logits.dtype, device=dev)
        counts.index_add_(0, _flat_index(outputs, V, dev), ones)
    counts = counts.view(n, V)
    generated = counts > 0
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = generated.clone()
        seen.view(-1)[_flat_index([h.prompt_token_ids for h in histories], V, dev)] = True
        rep = _column([p.repetition_penalty for p in params], dev)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    freq = _column([p.frequency_penalty for p in params], dev)
    presence = _column([p.presence_penalty for p in params], dev)
    return logits - freq * counts - presence * generated.to(logits.dtype)


def process_logits(logits: torch.Tensor, params: list[SamplingParams],
                   histories: Sequence[TokenHistory | None]) -> torch.Tensor:
    """Logits [N, V] after min_tokens' ban, logit_bias and the penalties, on the rows whose
    parameters ask for them (the others unchanged). Returns a new tensor."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    dev = logits.device
    sub = logits[_indices(rows, dev)]  # a copy
    banned = [(k, t) for k, i in enumerate(rows) if (h := histories[i]) is not None
              for t in h.banned_token_ids]
    if banned:
        r, t = zip(*banned, strict=True)
        sub[_indices(r, dev), _indices(t, dev)] = float("-inf")
    bias = [(k, t, b) for k, i in enumerate(rows) for t, b in (params[i].logit_bias or {}).items()]
    if bias:
        r, t, b = zip(*bias, strict=True)
        sub.index_put_((_indices(r, dev), _indices(t, dev)), to_device(b, sub.dtype, dev),
                       accumulate=True)
    penalised = [k for k, i in enumerate(rows) if params[i].has_penalties]
    if penalised:
        hist = [histories[rows[k]] for k in penalised]
        if any(h is None for h in hist):
            raise ValueError("penalties need the token history of their rows")
        index = _indices(penalised, dev)
        sub[index] = apply_penalties(sub[index], [params[rows[k]] for k in penalised],
                                     hist)  # type: ignore[arg-type]
    out = logits.clone()
    out[_indices(rows, dev)] = sub
    return out


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise.clamp_min_(_MIN_EXPONENTIAL)).argmax(dim=-1)


class Sampler:
    """logits [N, V] float32 + per-row SamplingParams (+ generator or None, + token history
    for rows that process their logits) -> SamplerOutput. Rows without a generator of their
    own draw from `generator` (the engine's, seeded by --seed), or torch's global one."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None] | None = None,
        histories: Sequence[TokenHistory | None] | None = None,
    ) -> SamplerOutput:
        N = logits.shape[0]
        if len(params) != N:
            raise ValueError(f"{N} logits rows but {len(params)} sampling params")
        gens = generators if generators is not None else [None] * N
        dev = logits.device
        raw = logits.float()
        logits = raw
        if any(p.processes_logits for p in params):
            logits = process_logits(raw, params, histories or [None] * N)
        tokens = logits.argmax(dim=-1)  # greedy rows keep this
        unseeded = [i for i, p in enumerate(params) if not p.greedy and gens[i] is None]
        seeded = [i for i, p in enumerate(params) if not p.greedy and gens[i] is not None]
        if unseeded:
            rows = _indices(unseeded, dev)
            probs = filtered_probs(logits[rows], [params[i] for i in unseeded])
            tokens[rows] = _race(probs, self.generator)
        for i in seeded:
            probs = filtered_probs(logits[i : i + 1], [params[i]])
            tokens[i] = _race(probs, gens[i])[0]
        out = SamplerOutput(token_ids=tokens)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            # Log-probabilities of the model's distribution, before any sampling transform.
            logp = raw.log_softmax(dim=-1)
            out.logprobs = logp.gather(1, tokens[:, None])[:, 0]
            k = max(wanted)
            if k > 0:
                out.top_logprobs, out.top_token_ids = logp.topk(k, dim=-1)
        return out
