"""Simulated KV storage for the FP8 ceiling study (bench/fp8_ceiling.py): K/V rows are
rounded as some storage format would round them, then kept in the full-precision cache.

A `RowRounding` maps the rows of one store call [T, kv_heads, head_dim] to the values a
kernel would read back. It composes, per side (K or V):

- an optional orthogonal rotation of each row (a Hadamard matrix; reading back rotates
  again by its transpose: a kernel would rotate q instead, and fold V's into W_v/W_o);
- an optional mean subtraction ("smoothing"): a per-channel vector mu is subtracted before
  rounding and added back after, so the stored values are round(x - mu) + mu. For K this
  is what a kernel adding q.mu back per page computes, and, when mu is shared by every key
  of a sequence, what one that adds nothing computes (softmax ignores a per-query
  constant); for V it is p-weighted mu added back per page (or mu once, shared);
- the element rounding: `round_mantissa` (m mantissa bits, unlimited exponent: e4m3's
  mantissa without its range limits; not a bound on scaled e4m3, whose amax/448 scale
  stores each block's largest element exactly), e4m3 codes with one scale per block of a
  row, per row (the production per-token-head scheme) or a fixed 1.0, or, for context,
  int8 codes with a per-row scale;
- optionally, the sequence's first tokens left unrounded.

`install` wraps a `KVPool`'s `store` on that instance only, so the engine, backends and
cache stay as they are: production code is not touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvcache.kv_dtype import (
    PER_TENSOR,
    PER_TOKEN_HEAD,
    dequantize_rows,
    quantize_rows,
)
from kvcache.pool import KVPool

FLOAT32_MANTISSA_BITS = 23


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (float32) rounded to `bits` explicit mantissa bits, to nearest even, exponent
    unlimited (no subnormals, no saturation): float32's bits with the low ones dropped."""
    if x.dtype != torch.float32:
        raise TypeError("round_mantissa takes float32")
    if not 0 <= bits < FLOAT32_MANTISSA_BITS:
        raise ValueError(f"mantissa bits must be in [0, {FLOAT32_MANTISSA_BITS})")
    drop = FLOAT32_MANTISSA_BITS - bits
    raw = x.contiguous().view(torch.int32)
    # + half an ulp of the target (minus one, plus the kept lowest bit: ties go to even);
    # a carry out of the mantissa increments the exponent, which is the right result.
    keep_lsb = (raw >> drop) & 1
    raw = (raw + ((1 << (drop - 1)) - 1) + keep_lsb) & ~((1 << drop) - 1)
    return raw.view(torch.float32)


def round_e4m3_blocks(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x [..., D] through e4m3 codes and back: one scale amax/448 per `block` consecutive
    elements of the last dimension (block = D: per row), or none (None: scale 1.0,
    saturating at +-448): kvcache.kv_dtype's quantize_rows / dequantize_rows on blocks."""
    if block is None:
        return dequantize_rows(*quantize_rows(x, PER_TENSOR))
    if x.shape[-1] % block:
        raise ValueError(f"block {block} does not divide the row's {x.shape[-1]} elements")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return dequantize_rows(*quantize_rows(blocks, PER_TOKEN_HEAD)).reshape(x.shape)


def round_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] through int8 codes and back: scale amax/127 per row, to nearest even."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / scales).clamp(-127, 127) * scales


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


ELEMENT_KINDS = ("none", "mantissa", "e4m3-row", "e4m3-block", "e4m3-tensor", "int8-row")


@dataclass(frozen=True)
class ElementRounding:
    """How each element is rounded: "none"; "mantissa" to `bits` bits; e4m3 codes with a
    scale per row ("e4m3-row", the production per-token-head scheme), per `block` elements
    of a row ("e4m3-block") or none ("e4m3-tensor": scale 1.0); for context, int8 codes
    with a scale amax/127 per row ("int8-row": a uniform grid, not FP8)."""

    kind: str = "none"
    bits: int = 3
    block: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ELEMENT_KINDS:
            raise ValueError(f"unknown element rounding {self.kind!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mantissa":
            return round_mantissa(x.float().contiguous(), self.bits)
        if self.kind == "e4m3-row":
            return round_e4m3_blocks(x, x.shape[-1])
        if self.kind == "e4m3-block":
            return round_e4m3_blocks(x, self.block)
        if self.kind == "e4m3-tensor":
            return round_e4m3_blocks(x, None)
        if self.kind == "int8-row":
            return round_int8_rows(x)
        return x


# Where mu comes from: "page": the mean of the rows first written to each group of
# `mu_tokens` positions (default: the page size; a page-aligned prefill chunk writes whole
# pages, a decode would write a page's first row alone); "page-first-row": each group's
# first row (what a decode-time store kernel has when it opens a page); "first-chunk": the
# mean of each layer's first store call, kept for the sequence; "static": a given per-(layer,
# KV head) vector (calibrated on other text).
MU_SOURCES = ("none", "page", "page-first-row", "first-chunk", "static")


@dataclass
class SideRounding:
    """The simulated storage of one side (K or V) of every layer. Positions are counted
    over a layer's store calls: one sequence per run (the teacher-forced protocol)."""

    element: ElementRounding = field(default_factory=ElementRounding)
    mu_source: str = "none"
    rotate: bool = False
    sign_seed: int | None = None  # rotation H diag(s), random signs s from this seed
    keep_first: int = 0  # the sequence's first tokens stay unrounded (attention sinks)
    static_mu: list[torch.Tensor] | None = None  # per layer [kv_heads, head_dim]
    mu_tokens: int | None = None  # positions per mu ("page" sources); None: the page size
    mu_element: ElementRounding = field(default_factory=ElementRounding)  # how mu is stored
    # state: per layer, the mu of each group seen so far / of the sequence; rows stored
    _group_mu: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict, repr=False)
    _sequence_mu: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _stored: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mu_source not in MU_SOURCES:
            raise ValueError(f"unknown mu source {self.mu_source!r}")
        if self.mu_source == "static" and self.static_mu is None:
            raise ValueError("a static mu needs its vectors")

    def rotation(self, n: int) -> torch.Tensor:
        """The orthonormal matrix rows are rotated by (float64): a Hadamard matrix, its
        columns' signs flipped at random when `sign_seed` is set."""
        h = hadamard(n)
        if self.sign_seed is None:
            return h
        g = torch.Generator().manual_seed(self.sign_seed)
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return h * signs

    def group_mu(self, layer: int, group: int) -> torch.Tensor:
        """The mu a group of positions got at its first write [kv_heads, head_dim]."""
        return self._group_mu[layer][group]

    def mu(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
           page_size: int) -> torch.Tensor | None:
        """The vector subtracted from each row [T, H, D], or None."""
        if self.mu_source == "none":
            return None
        if self.mu_source == "static":
            assert self.static_mu is not None
            return self.mu_element(self.static_mu[layer].to(rows.dtype)).expand_as(rows)
        if self.mu_source == "first-chunk":
            if layer not in self._sequence_mu:
                self._sequence_mu[layer] = self.mu_element(rows.mean(dim=0))
            return self._sequence_mu[layer].expand_as(rows)
        groups = (positions // (self.mu_tokens or page_size)).tolist()
        known = self._group_mu.setdefault(layer, {})
        fresh: dict[int, list[int]] = {}
        for i, group in enumerate(groups):
            if group not in known:
                fresh.setdefault(group, []).append(i)
        for group, idx in fresh.items():
            first_rows = rows[idx[:1]] if self.mu_source == "page-first-row" else rows[idx]
            known[group] = self.mu_element(first_rows.mean(dim=0))
        return torch.stack([known[g] for g in groups])

    def __call__(self, layer: int, rows: torch.Tensor, page_size: int) -> torch.Tensor:
        start = self._stored.get(layer, 0)
        self._stored[layer] = start + rows.shape[0]
        positions = start + torch.arange(rows.shape[0], device=rows.device)
        x = rows.float()
        mu = self.mu(layer, x, positions, page_size)
        if mu is not None:
            x = x - mu
        if self.rotate:
            h = self.rotation(x.shape[-1]).to(x.dtype)
            x = self.element(x @ h.T) @ h
        else:
            x = self.element(x)
        if mu is not None:
            x = x + mu
        if self.keep_first:
            x = torch.where((positions < self.keep_first)[:, None, None], rows.float(), x)
        return x.to(rows.dtype)


@dataclass
class RowRounding:
    """The simulated storage of K and V."""

    k: SideRounding = field(default_factory=SideRounding)
    v: SideRounding = field(default_factory=SideRounding)


StoreFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def install(pool: KVPool, rounding: RowRounding) -> None:
    """Make `pool` store rows as `rounding` would read them back (its cache must be full
    precision: the simulated values are stored as they are)."""
    if pool.kv_dtype.is_fp8:
        raise ValueError("the simulation stores into a full-precision cache")
    store: StoreFn = pool.store
    page_size = pool.layout.page_size

    def simulated_store(layer: int, k: torch.Tensor, v: torch.Tensor,
                        slots: torch.Tensor) -> None:
        store(layer, rounding.k(layer, k, page_size), rounding.v(layer, v, page_size), slots)

    pool.store = simulated_store  # type: ignore[method-assign]  # this instance only


class ChannelMeans:
    """Records the per-(layer, KV head) channel means of K and V over what a pool stores
    (calibration of a static mu)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.count: dict[tuple[str, int], int] = {}

    def install(self, pool: KVPool) -> None:
        store: StoreFn = pool.store

        def recording_store(layer: int, k: torch.Tensor, v: torch.Tensor,
                            slots: torch.Tensor) -> None:
            for side, rows in (("k", k), ("v", v)):
                key = (side, layer)
                total = rows.double().sum(dim=0)
                self.sums[key] = self.sums[key] + total if key in self.sums else total
                self.count[key] = self.count.get(key, 0) + rows.shape[0]
            store(layer, k, v, slots)

        pool.store = recording_store  # type: ignore[method-assign]

    def means(self, side: str, num_layers: int) -> list[torch.Tensor]:
        return [(self.sums[(side, i)] / self.count[(side, i)]).float() for i in range(num_layers)]
