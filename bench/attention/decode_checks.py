"""GPU correctness checks of the decode kernels that `bench attention --op decode --check`
runs before timing.

For each layout the benchmark times, every variant on a ragged batch (lengths 1 to 2049,
not multiples of the page size, shuffled pages, NaN in every cache slot no sequence owns),
with group sizes 4, 3, 8 and 1 and head dims 128 and 64 (softmax and silu; every variant on
the first), one split and several, through
`decode_attention` with the launch configuration serving uses (so the Gluon hnd_x kernel
where it applies); against float64 torch on the contiguous K/V. A check passes when the
relative error is under 1e-2 and every output element is finite (outputs start as NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attention.triton.decode import SplitBuffers, decode_attention, default_decode_config
from attention.triton.variants import triton_variant
from attention.variants import Variant, alibi_slopes, apply_variant_torch
from bench.attention.common import build_paged_kv
from kvcache.pool import write_slots

TOL = 1e-2
VARIANTS = (
    Variant("softmax"), Variant("softcap", 30.0), Variant("sliding_window", 200.0),
    Variant("alibi"), Variant("sigmoid"), Variant("silu"),
)
LENS = [1, 17, 300, 1000, 2049, 64, 65, 8]
# (query heads, KV heads, head dim, dtype): groups 4, 3, 8, 1
SHAPES = [(32, 8, 128, torch.bfloat16), (9, 3, 128, torch.bfloat16), (16, 2, 64, torch.float16),
          (8, 8, 64, torch.bfloat16)]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float,
               variant: Variant) -> torch.Tensor:
    """float64 attention of each sequence's one query over its first lens[b] keys."""
    hq, hkv = q.shape[1], k.shape[2]
    outs = []
    for b, n in enumerate(lens):
        keys = k[b, :n].double().repeat_interleave(hq // hkv, 1)  # [n, Hq, D]
        vals = v[b, :n].double().repeat_interleave(hq // hkv, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), keys)[:, None, :] * scale
        q_pos = torch.full((1, 1, 1), n - 1, device=q.device)
        k_pos = torch.arange(n, device=q.device).view(1, 1, n)
        visible = torch.ones(1, 1, n, dtype=torch.bool, device=q.device)
        weights = apply_variant_torch(variant, scores, q_pos, k_pos, visible)
        outs.append(torch.einsum("hn,nhd->hd", weights[:, 0], vals))
    return torch.stack(outs)


def ragged_checks(
    layout_name: str, page_size: int, device: torch.device, generator: torch.Generator,
    shapes: Sequence[tuple[int, int, int, torch.dtype]] = SHAPES, lens: Sequence[int] = LENS,
    variants: Sequence[Variant] | None = None,
) -> list[dict[str, Any]]:
    """One result per (shape, variant, split count). By default every variant runs on the
    first shape and softmax and silu on the others; `variants` runs those on every shape."""
    results = []
    lens = list(lens)
    B, L = len(lens), max(lens)
    for hq, hkv, d, dtype in shapes:
        q = torch.randn(B, hq, d, device=device, dtype=dtype, generator=generator)
        k = torch.randn(B, L, hkv, d, device=device, dtype=dtype, generator=generator)
        v = torch.randn(B, L, hkv, d, device=device, dtype=dtype, generator=generator)
        paged = build_paged_kv(k, v, lens, layout_name, page_size, generator)
        P = paged.layout.page_size
        owned = torch.zeros(paged.k_cache.numel() // (hkv * d), dtype=torch.bool, device=device)
        for b, n in enumerate(lens):
            pos = torch.arange(n, device=device)
            owned[paged.block_table[b, pos // P].long() * P + pos % P] = True
        stale = (~owned).nonzero().flatten()
        nan = torch.full((stale.numel(), hkv, d), float("nan"), device=device, dtype=dtype)
        write_slots(paged.k_cache, paged.layout, stale, nan)
        write_slots(paged.v_cache, paged.layout, stale, nan)
        config = default_decode_config(paged.layout, d, True)
        slopes = alibi_slopes(hq).float().to(device)
        # every variant on the first shape; the others (a compile each) softmax and silu
        first = hq == shapes[0][0] and d == shapes[0][2]
        for variant in variants or (VARIANTS if first else VARIANTS[::5]):
            want = _reference(q, k, v, lens, d**-0.5, variant)
            # the decode kernel's three split classes: 1 (direct output), other, 16k
            for splits in (1, 3, 16) if variant.name == "softmax" else (1, 16):
                out = torch.full_like(q, float("nan"))
                decode_attention(q, paged.k_cache, paged.v_cache, paged.layout,
                                 paged.block_table, paged.seq_lens, out, d**-0.5,
                                 triton_variant(variant), slopes, splits,
                                 SplitBuffers.empty(device), config)
                err = float((out.double() - want).norm() / want.norm())
                finite = bool(torch.isfinite(out).all())
                results.append({
                    "layout": layout_name, "page_size": P, "heads": [hq, hkv], "head_dim": d,
                    "dtype": str(dtype).removeprefix("torch."), "variant": str(variant),
                    "splits": splits, "gluon_hndx": config.gluon_hndx, "rel_err": err,
                    "finite": finite, "ok": finite and err < TOL,
                })
    return results
