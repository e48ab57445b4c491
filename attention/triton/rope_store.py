"""Fused rotary embedding + K/V store into the paged pool, for every KV layout.

One program per new token: it reads the token's cos|sin row, rotates q (written to
`q_out`) and k (neox / Hugging Face rotate_half convention, in float32), and stores the
rotated k and the plain v at the token's slot:

    rot(x) = (x1 * cos - x2 * sin | x2 * cos + x1 * sin),  x = (x1 | x2) split in halves
    cos_sin_cache [max_positions, head_dim] = (cos half | sin half), float32

With ROTATE=False the same kernel is the plain K/V store (q untouched, no cos|sin read).

hnd_x gets its own kernel. There a 16-byte run holds one dim of x consecutive slots, so one
token's head vector lands 2 bytes in each of head_dim runs: stored a token at a time, every
2-byte store is its own memory transaction. `_rope_store_hndx_kernel` takes BLOCK_T tokens
per program and stores [heads, dims, tokens] tiles whose last (fastest) axis is the token:
consecutive lanes write consecutive slots, so a warp's stores fill whole runs whenever the
tokens' slots are consecutive (a prompt's are), and stay correct when they are not. q is
rotated by the per-token kernel (STORE_KV=False) in a launch of its own: inside the tile
kernel the 16 tokens' q rows ran one after another, and a decode step of 64 tokens had
four programs (docs/kernels.md, "Launch choices").

FP8 caches (`KV_QUANT`, attention/triton/fp8.py) are quantized here, on store: with
per-(token, head) scales each program computes its rows' amax over head_dim, stores the
float32 scale at the slot and the e4m3 codes of row / scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.triton.fp8 import encode, quant_mode, row_scale
from kvcache.layout import HNDX_ID, KVLayout

# Tokens per program of the hnd_x kernel: x of them (8 for 2-byte elements) fill a 16-byte
# run; 16 give each program two runs per (head, dim).
HNDX_BLOCK_T = 16


@triton.jit
def _slot_offsets(slot, heads, offs_d, s_page, s_off, s_head, PAGE_SIZE: tl.constexpr):
    """Element offsets [H, D] of one slot's (head, dim) elements in a token/nhd/hnd cache."""
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    return page * s_page + off * s_off + heads[:, None] * s_head + offs_d[None, :]


@triton.jit
def _rotate_halves(ptr, row, heads, offs_h, mask, cos, sin, stride_h, HALF: tl.constexpr):
    """Load x [H, 2*HALF] as two halves and return the rotated halves (float32)."""
    base = ptr + row + heads[:, None] * stride_h + offs_h[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


# A hybrid backend hands this kernel slices of the step's positions/slots that start after
# the decodes; their alignment then changes with the decode count, and specialising on it
# would build new instances mid-serving.
@triton.jit(do_not_specialize=["positions", "slots"])
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, positions, cos_sin, slots, k_cache, v_cache,
    k_scale, v_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_cs,
    s_page, s_off, s_head, s_scale_page, s_scale_head,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, ROTATE: tl.constexpr, STORE_KV: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    kv_heads = tl.arange(0, HKV_PAD)
    kv_mask_h = kv_heads < NUM_KV_HEADS
    cache_ty = k_cache.dtype.element_ty
    # per-(token, head) scales: [pages, kv_heads, page_size]
    scale_dst = (slot // PAGE_SIZE) * s_scale_page + kv_heads * s_scale_head + slot % PAGE_SIZE
    if ROTATE:
        pos = tl.load(positions + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_HALF)
        mask_half = offs_h < HALF
        cos = tl.load(cos_sin + pos * stride_cs + offs_h, mask=mask_half, other=0.0)[None, :]
        sin = tl.load(cos_sin + pos * stride_cs + HALF + offs_h, mask=mask_half, other=0.0)[None, :]
        q_heads = tl.arange(0, HQ_PAD)
        q_mask = (q_heads < NUM_Q_HEADS)[:, None] & mask_half[None, :]
        q1, q2 = _rotate_halves(q_ptr, t * stride_qt, q_heads, offs_h, q_mask, cos, sin,
                                stride_qh, HALF)
        q_out = q_out_ptr + t * stride_qot + q_heads[:, None] * stride_qoh + offs_h[None, :]
        tl.store(q_out, q1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_out + HALF, q2.to(q_out_ptr.dtype.element_ty), mask=q_mask)
        if STORE_KV:
            k_mask = kv_mask_h[:, None] & mask_half[None, :]
            k1, k2 = _rotate_halves(k_ptr, t * stride_kt, kv_heads, offs_h, k_mask, cos, sin,
                                    stride_kh, HALF)
            k_sc = 1.0
            if KV_QUANT == 2:  # masked entries are 0: they never raise the amax
                k_sc = row_scale(tl.maximum(tl.max(tl.abs(k1), 1), tl.max(tl.abs(k2), 1)))
                tl.store(k_scale + scale_dst, k_sc, mask=kv_mask_h)
                k_sc = k_sc[:, None]
            dst = _slot_offsets(slot, kv_heads, offs_h, s_page, s_off, s_head, PAGE_SIZE)
            tl.store(k_cache + dst, encode(k1, k_sc, KV_QUANT).to(cache_ty), mask=k_mask)
            dst2 = _slot_offsets(slot, kv_heads, offs_h + HALF, s_page, s_off, s_head,
                                 PAGE_SIZE)
            tl.store(k_cache + dst2, encode(k2, k_sc, KV_QUANT).to(cache_ty), mask=k_mask)
    if STORE_KV:
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = kv_mask_h[:, None] & (offs_d < HEAD_DIM)[None, :]
        dst = _slot_offsets(slot, kv_heads, offs_d, s_page, s_off, s_head, PAGE_SIZE)
        if not ROTATE:
            k = tl.load(k_ptr + t * stride_kt + kv_heads[:, None] * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0).to(tl.float32)
            tl.store(k_cache + dst, _encode_rows(k, k_scale, scale_dst, kv_mask_h, 1,
                                                 KV_QUANT).to(cache_ty), mask=kv_mask)
        v = tl.load(v_ptr + t * stride_vt + kv_heads[:, None] * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(tl.float32)
        tl.store(v_cache + dst, _encode_rows(v, v_scale, scale_dst, kv_mask_h, 1,
                                             KV_QUANT).to(cache_ty), mask=kv_mask)


@triton.jit
def _encode_rows(x, scale_ptr, scale_dst, scale_mask, AXIS: tl.constexpr,
                 KV_QUANT: tl.constexpr):
    """Rows of x (float32, reduced over AXIS, the head dim; masked entries 0) as stored;
    with per-(token, head) scales, their scales are stored at `scale_dst` on the way."""
    scale = 1.0
    if KV_QUANT == 2:
        row = row_scale(tl.max(tl.abs(x), AXIS))
        tl.store(scale_ptr + scale_dst, row, mask=scale_mask)
        scale = tl.expand_dims(row, AXIS)
    return encode(x, scale, KV_QUANT)



@triton.jit
def _hndx_tile_offsets(slots_t, heads, offs_d, s_page, s_head, s_xblk,
                       PAGE_SIZE: tl.constexpr, X: tl.constexpr):
    """Element offsets [H, D, T] of tokens' (head, dim) elements in an hnd_x cache."""
    page = slots_t // PAGE_SIZE
    off = slots_t % PAGE_SIZE
    base = page * s_page + (off // X) * s_xblk + off % X
    return base[None, None, :] + heads[:, None, None] * s_head + offs_d[None, :, None] * X


# num_tokens is not specialised either: a step's token count changes every step.
@triton.jit(do_not_specialize=["positions", "slots", "num_tokens"])
def _rope_store_hndx_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, positions, cos_sin, slots, k_cache, v_cache,
    k_scale, v_scale, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_cs,
    s_page, s_head, s_xblk, s_scale_page, s_scale_head,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, X: tl.constexpr, ROTATE: tl.constexpr, BLOCK_T: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    t0 = tl.program_id(0) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    slots_t = tl.load(slots + offs_t, mask=t_mask, other=0).to(tl.int64)
    kv_heads = tl.arange(0, HKV_PAD)
    kv_mask_h = kv_heads < NUM_KV_HEADS
    cache_ty = k_cache.dtype.element_ty
    # [T, H] scales of an FP8 cache with per-(token, head) scales
    scale_dst = ((slots_t // PAGE_SIZE) * s_scale_page + slots_t % PAGE_SIZE)[:, None] + (
        kv_heads * s_scale_head)[None, :]
    scale_mask = t_mask[:, None] & kv_mask_h[None, :]
    # [T, H, D] tiles as read; stored transposed to [H, D, T]
    t3 = offs_t[:, None, None]
    h3 = kv_heads[None, :, None]
    if ROTATE:
        offs_h = tl.arange(0, BLOCK_HALF)
        mask_half = offs_h < HALF
        pos_t = tl.load(positions + offs_t, mask=t_mask, other=0).to(tl.int64)
        d3 = offs_h[None, None, :]
        cs_mask = t_mask[:, None] & mask_half[None, :]
        cs_rows = cos_sin + pos_t[:, None] * stride_cs + offs_h[None, :]
        cos = tl.load(cs_rows, mask=cs_mask, other=0.0)[:, None, :]
        sin = tl.load(cs_rows + HALF, mask=cs_mask, other=0.0)[:, None, :]
        k_mask = t_mask[:, None, None] & kv_mask_h[None, :, None] & mask_half[None, None, :]
        k_rows = k_ptr + t3 * stride_kt + h3 * stride_kh + d3
        k1 = tl.load(k_rows, mask=k_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_rows + HALF, mask=k_mask, other=0.0).to(tl.float32)
        r1 = k1 * cos - k2 * sin
        r2 = k2 * cos + k1 * sin
        k_sc = 1.0
        if KV_QUANT == 2:
            k_sc = row_scale(tl.maximum(tl.max(tl.abs(r1), 2), tl.max(tl.abs(r2), 2)))
            tl.store(k_scale + scale_dst, k_sc, mask=scale_mask)
            k_sc = k_sc[:, :, None]
        store_mask = tl.permute(k_mask, (1, 2, 0))
        dst = _hndx_tile_offsets(slots_t, kv_heads, offs_h, s_page, s_head, s_xblk, PAGE_SIZE, X)
        tl.store(k_cache + dst, tl.permute(encode(r1, k_sc, KV_QUANT).to(cache_ty), (1, 2, 0)),
                 mask=store_mask)
        tl.store(k_cache + dst + HALF * X,
                 tl.permute(encode(r2, k_sc, KV_QUANT).to(cache_ty), (1, 2, 0)),
                 mask=store_mask)
    offs_d = tl.arange(0, BLOCK_D)
    d3 = offs_d[None, None, :]
    kv_mask = t_mask[:, None, None] & kv_mask_h[None, :, None] & (offs_d < HEAD_DIM)[None, None, :]
    store_mask = tl.permute(kv_mask, (1, 2, 0))
    dst = _hndx_tile_offsets(slots_t, kv_heads, offs_d, s_page, s_head, s_xblk, PAGE_SIZE, X)
    if not ROTATE:
        k = tl.load(k_ptr + t3 * stride_kt + h3 * stride_kh + d3, mask=kv_mask,
                    other=0.0).to(tl.float32)
        k = _encode_rows(k, k_scale, scale_dst, scale_mask, 2, KV_QUANT)
        tl.store(k_cache + dst, tl.permute(k.to(cache_ty), (1, 2, 0)), mask=store_mask)
    v = tl.load(v_ptr + t3 * stride_vt + h3 * stride_vh + d3, mask=kv_mask,
                other=0.0).to(tl.float32)
    v = _encode_rows(v, v_scale, scale_dst, scale_mask, 2, KV_QUANT)
    tl.store(v_cache + dst, tl.permute(v.to(cache_ty), (1, 2, 0)), mask=store_mask)


def _launch(
    q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, q_out: torch.Tensor | None,
    positions: torch.Tensor | None, cos_sin_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
) -> None:
    T, Hkv, D = k.shape
    if T == 0:
        return
    if slot_mapping.shape[0] != T or v.shape[0] != T:
        raise ValueError(f"{T} new tokens but {slot_mapping.shape[0]} slots, {v.shape[0]} v rows")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dimension")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both K and V scales or neither")
    kv_quant = quant_mode(k_cache, k_scale)
    if k_scale is not None and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("scales go with an FP8 (float8_e4m3fn) cache only")
    rotate = q is not None
    s_page, s_off, s_head, _, s_xblk = layout.strides()
    s_scale_page, s_scale_head = layout.scale_strides()
    Hq = q.shape[1] if rotate else Hkv
    half = D // 2
    dummy = k
    tensors = (q if rotate else dummy, k, v, q_out if rotate else dummy,
               positions if rotate else slot_mapping, cos_sin_cache if rotate else dummy,
               slot_mapping, k_cache, v_cache,
               k_scale if k_scale is not None else dummy, v_scale if v_scale is not None else dummy)
    strides = (q.stride(0) if rotate else 0, q.stride(1) if rotate else 0,
               k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               q_out.stride(0) if rotate else 0, q_out.stride(1) if rotate else 0,
               cos_sin_cache.stride(0) if rotate else 0)
    shapes = dict(NUM_Q_HEADS=Hq, NUM_KV_HEADS=Hkv,
                  HQ_PAD=triton.next_power_of_2(Hq), HKV_PAD=triton.next_power_of_2(Hkv),
                  HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), HALF=half,
                  BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
                  PAGE_SIZE=layout.page_size, ROTATE=rotate)
    if layout.kernel_id == HNDX_ID:
        if rotate:  # q a token per program, as for the other layouts (see module docstring)
            _rope_store_kernel[(T,)](
                *tensors, *strides, s_page, s_off, s_head, s_scale_page, s_scale_head,
                **shapes, STORE_KV=False, KV_QUANT=0, num_warps=4 if Hq * D >= 2048 else 1,
            )
        _rope_store_hndx_kernel[(triton.cdiv(T, HNDX_BLOCK_T),)](
            *tensors, T, *strides, s_page, s_head, s_xblk, s_scale_page, s_scale_head, **shapes,
            X=layout.x, BLOCK_T=HNDX_BLOCK_T, KV_QUANT=kv_quant, num_warps=4,
        )
        return
    _rope_store_kernel[(T,)](
        *tensors, *strides, s_page, s_off, s_head, s_scale_page, s_scale_head, **shapes,
        STORE_KV=True, KV_QUANT=kv_quant, num_warps=4 if Hq * D >= 2048 else 1,
    )


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    q_out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] at `positions` [T]; store rotated k and v
    [T, Hkv, D] into the caches at `slot_mapping` [T]. Returns the rotated q (`q_out`, a new
    tensor when None; it may be q itself: each element is read before it is written).
    FP8 caches are quantized on store: with `k_scale`/`v_scale` ([pages, kv_heads,
    page_size] float32) one scale per (token, head) row, without them a scale of 1.0."""
    if q.shape[-1] % 2:
        raise ValueError("rotary needs an even head dim")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous last dimension")
    if cos_sin_cache.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"cos_sin_cache has {cos_sin_cache.shape[-1]} columns, head dim is {q.shape[-1]}"
        )
    if q_out is None:
        q_out = torch.empty_like(q)
    _launch(q, k, v, q_out, positions, cos_sin_cache, slot_mapping, k_cache, v_cache, layout,
            k_scale, v_scale)
    return q_out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Store k, v [T, Hkv, D] into the caches at `slot_mapping` [T] (no rotary); FP8 caches
    as in `rope_store`."""
    _launch(None, k, v, None, None, None, slot_mapping, k_cache, v_cache, layout,
            k_scale, v_scale)
