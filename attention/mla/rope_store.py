"""Fused rotary + latent store for MLA: one program per new token.

It stores the token's row into the latent cache at its slot: the latent (first `rank`
columns of k, copied) and the rotary key (last `rope` columns, rotated), and rotates the
rotary columns of every head's query in place in `q`. Rotation is attention/rotary.py's
rotate-half on float32 cos|sin rows, computed in float32:

    rot(x) = (x1 * cos - x2 * sin | x2 * cos + x1 * sin),  x = (x1 | x2)

With ROTATE=False it is the plain row store (q untouched, no cos|sin read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# a hybrid backend's slices of positions/slots start anywhere: no alignment specialisation
@triton.jit(do_not_specialize=["positions", "slots"])
def _mla_rope_store_kernel(
    q_ptr, k_ptr, positions, cos_sin, slots, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_cs, stride_slot,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, RANK: tl.constexpr,
    HALF: tl.constexpr, ROTATE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    offs_c = tl.arange(0, RANK)
    offs_h = tl.arange(0, HALF)
    k_row = k_ptr + t.to(tl.int64) * stride_kt
    dst = cache_ptr + slot * stride_slot
    tl.store(dst + offs_c, tl.load(k_row + offs_c).to(cache_ptr.dtype.element_ty))
    k1 = tl.load(k_row + RANK + offs_h).to(tl.float32)
    k2 = tl.load(k_row + RANK + HALF + offs_h).to(tl.float32)
    if ROTATE:
        pos = tl.load(positions + t).to(tl.int64)
        cos = tl.load(cos_sin + pos * stride_cs + offs_h)
        sin = tl.load(cos_sin + pos * stride_cs + HALF + offs_h)
        tl.store(dst + RANK + offs_h, (k1 * cos - k2 * sin).to(cache_ptr.dtype.element_ty))
        tl.store(dst + RANK + HALF + offs_h,
                 (k2 * cos + k1 * sin).to(cache_ptr.dtype.element_ty))
        heads = tl.arange(0, HEADS_PAD)
        mask = (heads < NUM_HEADS)[:, None]
        q_row = q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + RANK
        q1 = tl.load(q_row + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_row + HALF + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
        out_ty = q_ptr.dtype.element_ty
        tl.store(q_row + offs_h[None, :], (q1 * cos[None, :] - q2 * sin[None, :]).to(out_ty),
                 mask=mask)
        tl.store(q_row + HALF + offs_h[None, :],
                 (q2 * cos[None, :] + q1 * sin[None, :]).to(out_ty), mask=mask)
    else:
        tl.store(dst + RANK + offs_h, k1.to(cache_ptr.dtype.element_ty))
        tl.store(dst + RANK + HALF + offs_h, k2.to(cache_ptr.dtype.element_ty))


def mla_rope_store(q: torch.Tensor, k: torch.Tensor, kv_lora_rank: int, slots: torch.Tensor,
                   cache: torch.Tensor, positions: torch.Tensor | None = None,
                   cos_sin_cache: torch.Tensor | None = None) -> None:
    """Store k [T, 1, rank + rope] (or [T, rank + rope]) at `slots` in `cache`
    [pages, page_size, rank + rope]; with `positions` and `cos_sin_cache`, rotate the
    rotary columns of k before storing and those of q [T, H, rank + rope] in place."""
    T = k.shape[0]
    if T == 0:
        return
    k2d = k.reshape(T, k.shape[-1])
    rope = k2d.shape[-1] - kv_lora_rank
    half = rope // 2
    for n, what in ((kv_lora_rank, "kv_lora_rank"), (half, "half rope dim")):
        if n & (n - 1):
            raise ValueError(f"the MLA store kernel needs a power-of-two {what}, got {n}")
    rotate = positions is not None and cos_sin_cache is not None
    if rotate and cos_sin_cache.shape[-1] != rope:
        raise ValueError(f"cos|sin cache of width {cos_sin_cache.shape[-1]}, rope dim {rope}")
    if q.stride(-1) != 1 or k2d.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last dimension")
    H = q.shape[1]
    _mla_rope_store_kernel[(T,)](
        q, k2d, positions if rotate else slots, cos_sin_cache if rotate else k2d, slots, cache,
        q.stride(0), q.stride(1), k2d.stride(0),
        cos_sin_cache.stride(0) if rotate else 0, cache.stride(1),
        NUM_HEADS=H, HEADS_PAD=triton.next_power_of_2(H), RANK=kv_lora_rank, HALF=half,
        ROTATE=rotate, num_warps=4,
    )
