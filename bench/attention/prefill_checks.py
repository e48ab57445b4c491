"""GPU correctness checks of the extend kernel that the prefill benchmark runs first.

Every variant on a ragged bf16 batch (empty and odd-length prefixes, a one-token run,
shuffled pages, NaN in every cache slot no sequence owns), against the reference backend's
batched torch path in fp32; plus the SmolLM2 shape (head dim 64, 9 query / 3 KV heads).
Each check returns a dict with the relative error and whether it is under 1e-2 with every
output element written.
"""

from __future__ import annotations

from typing import Any

import torch

from attention.backends.reference import attend_group, plan_group
from attention.base import AttentionConfig
from attention.batch import ForwardBatch
from attention.triton.extend import extend_attention
from attention.variants import Variant
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig, write_slots

TOL = 1e-2
VARIANTS = (
    Variant("softmax"), Variant("softcap", 2.0), Variant("sliding_window", 256.0),
    Variant("alibi"), Variant("sigmoid"), Variant("silu"),
)


def _check(
    device: torch.device, layout_name: str, page_size: int, hq: int, hkv: int, d: int,
    variant: Variant, prefix_lens: list[int], q_lens: list[int],
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, Any]:
    layout = KVLayout.create(layout_name, page_size, hkv, d, str(dtype))
    P = layout.page_size
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens, strict=True)]
    pages_needed = [-(-s // P) for s in seq_lens]
    num_pages = sum(pages_needed) + 1
    pool = KVPool(KVPoolConfig(layout, 1, num_pages, dtype, device))
    ids = (torch.randperm(num_pages - 1) + 1).tolist()
    tables = [[ids.pop() for _ in range(n)] for n in pages_needed]
    owned = torch.zeros(num_pages * P, dtype=torch.bool)
    for table, s in zip(tables, seq_lens, strict=True):
        pos = torch.arange(s)
        slots = torch.tensor(table)[pos // P] * P + pos % P
        owned[slots] = True
        for cache in (pool.k_caches[0], pool.v_caches[0]):
            write_slots(cache, layout, slots.to(device), torch.randn(s, hkv, d, device=device))
    batch = ForwardBatch.build(q_lens, prefix_lens, tables, P, device, num_decodes=0)
    q = torch.randn(batch.num_tokens, hq, d, device=device, dtype=dtype)
    config = AttentionConfig(hq, hkv, d, d**-0.5, variant)
    plan = plan_group(batch, 0)
    ref = attend_group(plan, q, pool, 0, config, torch.float32)
    ref = ref[plan.q_valid]
    # Slots no sequence owns (page tails past seq_len, other pages) become NaN: a kernel that
    # reads a key past a sequence's end then fails the finiteness check.
    stale = (~owned).nonzero().flatten().to(device)
    nan = torch.full((stale.numel(), hkv, d), float("nan"), device=device)
    for cache in (pool.k_caches[0], pool.v_caches[0]):
        write_slots(cache, layout, stale, nan)
    out = torch.full_like(q, float("nan"))
    extend_attention(
        q, pool.k_caches[0], pool.v_caches[0], layout, batch.qo_indptr, batch.prefix_lens,
        batch.seq_lens, batch.block_table, out, config.scale, variant, batch.max_q_len,
    )
    finite = bool(torch.isfinite(out).all())
    err = float((out.float() - ref).norm() / ref.norm())
    return {"variant": str(variant), "layout": layout_name, "page_size": P, "heads": [hq, hkv],
            "head_dim": d, "rel_err": f"{err:.1e}", "ok": finite and err < TOL}


def check_variants(device: torch.device) -> list[dict[str, Any]]:
    prefix, new = [0, 1000, 77, 323], [300, 129, 1, 700]
    results = [_check(device, "nhd", 64, 32, 8, 128, v, prefix, new) for v in VARIANTS]
    for layout_name, page_size in (("hnd", 64), ("token", 1), ("hnd_x", 64), ("hnd", 16)):
        results.append(
            _check(device, layout_name, page_size, 32, 8, 128, Variant("softmax"), prefix, new)
        )
    return results


def check_head_dim_64(device: torch.device) -> list[dict[str, Any]]:
    """SmolLM2-135M's attention shape."""
    prefix, new = [0, 45, 300], [200, 31, 77]
    return [_check(device, name, p, 9, 3, 64, Variant("softmax"), prefix, new)
            for name, p in (("nhd", 16), ("nhd", 64), ("hnd", 64), ("token", 1))]
