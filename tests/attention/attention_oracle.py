"""An independent float64 attention oracle on contiguous per-sequence K/V (no pages), and a
helper that writes the same K/V into a paged pool with shuffled page ids."""

from __future__ import annotations

import math
import random

import torch

from kvcache.layout import KVLayout


def oracle_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes written out independently of attention.variants."""
    def geometric(n: int) -> list[float]:
        first = 2 ** (-8 / n)
        return [first ** (i + 1) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return geometric(num_heads)
    base = 2 ** math.floor(math.log2(num_heads))
    return geometric(base) + geometric(2 * base)[::2][: num_heads - base]


def oracle_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float,
    variant: str = "softmax", param: float = 0.0,
) -> torch.Tensor:
    """q [Lq, Hq, D] at positions prefix_len.., k/v [Lk, Hkv, D] at positions 0..Lk-1."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, Hq, D = q.shape
    Lk, Hkv, _ = k.shape
    group = Hq // Hkv
    slopes = oracle_slopes(Hq)
    out = torch.zeros(Lq, Hq, D, dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(Lq):
            qpos = prefix_len + i
            s = (kh @ q[i, h]) * scale
            kpos = torch.arange(Lk, dtype=torch.float64)
            allowed = kpos <= qpos
            if variant == "softcap":
                s = param * torch.tanh(s / param)
            elif variant == "alibi":
                s = s + slopes[h] * (kpos - qpos)
            elif variant == "sliding_window":
                allowed = allowed & (qpos - kpos < param)
            if variant in ("sigmoid", "silu"):
                w = torch.sigmoid(s) if variant == "sigmoid" else s * torch.sigmoid(s)
                w = torch.where(allowed, w, 0.0)
                if variant == "silu":
                    w = w / allowed.sum().clamp(min=1)
            else:
                s = torch.where(allowed, s, -math.inf)
                w = torch.softmax(s, 0) if allowed.any() else torch.zeros_like(s)
            out[i, h] = w @ vh
    return out


def random_page_tables(
    seq_lens: list[int], page_size: int, num_pages: int, rng: random.Random
) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) page ids from 1..num_pages-1 (0 is scratch)."""
    ids = list(range(1, num_pages))
    rng.shuffle(ids)
    tables = []
    for n in seq_lens:
        need = -(-n // page_size)
        tables.append([ids.pop() for _ in range(need)])
    return tables


def place_token(cache: torch.Tensor, layout: KVLayout, page: int, off: int, vals: torch.Tensor) -> None:
    """Write one token's [Hkv, D] values by direct indexing of the layout's shape."""
    if layout.name == "token":
        cache[page] = vals
    elif layout.name == "nhd":
        cache[page, off] = vals
    elif layout.name == "hnd":
        cache[page, :, off] = vals
    else:
        cache[page, :, off // layout.x, :, off % layout.x] = vals
