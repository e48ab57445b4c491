"""Chunked lightning-attention extend (prefill) in Triton.

One program per (value block, head, sequence) walks its sequence in chunks of `chunk`
tokens aligned to absolute positions (the first chunk may start inside, the last end
inside), keeping the float32 state slice S [D, BLOCK_V] in registers the whole way:

    out  = (q @ S) * exp(-lam (i - lo + 1))          the incoming state, decayed to row i
         + ((q @ k^T) * exp(-lam (i - j)) [j <= i]) @ v   the chunk's own causal part
    S    = exp(-lam n) S + k^T @ (v * exp(-lam (hi - 1 - j)))    n = hi - lo rows folded

with lo/hi the chunk's first and past-last valid rows. Dots take the inputs' dtype (bf16
or fp16 on tensor cores, float32 accumulation; float32 inputs use exact float32 dots).
Chunks end on absolute multiples of `chunk`, so a snapshot every N tokens (N a multiple of
SNAPSHOT_ALIGN, which every chunk size here divides) is the state at some chunk's end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attention.linear.args import SNAPSHOT_ALIGN, check_extend_args, check_out


@dataclass(frozen=True)
class ExtendConfig:
    chunk: int = 64  # tokens a step; divides SNAPSHOT_ALIGN
    block_v: int = 64  # value columns of the state a program owns
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_EXTEND_CONFIG = ExtendConfig()


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """a @ b + acc in float32; UPCAST_DOTS multiplies the (already rounded) operands in
    float32, for the CPU interpreter, whose bf16 dot is wrong."""
    if UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def _lightning_extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qo_indptr_ptr, prefix_ptr, slopes_ptr,
    states_ptr, state_slots_ptr, snap_slots_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_slot, stride_head, snap_cols, snapshot_every,
    D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_SNAPSHOTS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    vb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    row0 = tl.load(qo_indptr_ptr + b)
    start = tl.load(prefix_ptr + b)  # absolute position of row0
    end = start + tl.load(qo_indptr_ptr + b + 1) - row0
    lam = tl.load(slopes_ptr + h)
    slot = tl.load(state_slots_ptr + b).to(tl.int64)

    offs_d = tl.arange(0, D)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    state_tile = offs_d[:, None] * D + offs_v[None, :]
    head_base = h * stride_head
    S = tl.load(states_ptr + slot * stride_slot + head_base + state_tile)
    rate = lam * 1.4426950408889634  # exp(-lam x) = exp2(-rate x)
    first_snap = start // tl.maximum(snapshot_every, 1)

    for c0 in tl.range(start // CHUNK * CHUNK, end, CHUNK, num_stages=NUM_STAGES):
        pos = c0 + offs_c
        valid = (pos >= start) & (pos < end)
        lo = tl.maximum(c0, start) - c0
        hi = tl.minimum(c0 + CHUNK, end) - c0
        rows = (row0 + pos - start).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + h * stride_vh + offs_v[None, :],
                    mask=valid[:, None], other=0.0)

        # the incoming state, decayed to each row
        query_decay = tl.exp2(-rate * (offs_c - lo + 1).to(tl.float32))
        o = _dot(q, S.to(q.dtype), tl.zeros([CHUNK, BLOCK_V], dtype=tl.float32),
                 DOT_PRECISION, UPCAST_DOTS) * query_decay[:, None]
        # the chunk's own causal part; the mask is built from positions each chunk (a
        # loop-invariant [CHUNK, CHUNK] tile would hold registers the whole loop)
        gap = (pos[:, None] - pos[None, :]).to(tl.float32)
        causal_decay = tl.where(gap >= 0, tl.exp2(-rate * tl.maximum(gap, 0.0)), 0.0)
        scores = _dot(q, tl.trans(k), tl.zeros([CHUNK, CHUNK], dtype=tl.float32),
                      DOT_PRECISION, UPCAST_DOTS) * causal_decay
        o = _dot(scores.to(v.dtype), v, o, DOT_PRECISION, UPCAST_DOTS)
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_v[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=valid[:, None])

        # decay the values, not the keys: v's tile is the smaller one, and k then feeds
        # the dot straight from shared memory. Rows past hi are zero; the where keeps
        # their exp2(+) weight out too.
        key_decay = tl.where(valid, tl.exp2(-rate * (hi - 1 - offs_c).to(tl.float32)), 0.0)
        v_decayed = (v * key_decay[:, None]).to(v.dtype)
        S = S * tl.exp2(-rate * (hi - lo).to(tl.float32))
        S = _dot(tl.trans(k), v_decayed, S, DOT_PRECISION, UPCAST_DOTS)

        if HAS_SNAPSHOTS:
            chunk_end = c0 + CHUNK
            if (hi == CHUNK) & (chunk_end % snapshot_every == 0):
                idx = chunk_end // snapshot_every - first_snap - 1
                target = tl.load(snap_slots_ptr + b * snap_cols + idx)
                if target >= 0:
                    tl.store(states_ptr + target.to(tl.int64) * stride_slot + head_base
                             + state_tile, S)

    tl.store(states_ptr + slot * stride_slot + head_base + state_tile, S)


def _check_kernel_shapes(q: torch.Tensor, states: torch.Tensor, block_v: int) -> None:
    D = q.shape[2]
    if D < 16 or D & (D - 1):
        raise ValueError(f"the Triton lightning kernels need a power-of-two head_dim >= 16, "
                         f"got {D}")
    if D % block_v:
        raise ValueError(f"block_v {block_v} must divide head_dim {D}")
    if states.dtype != torch.float32 or states.stride(3) != 1 or states.stride(2) != D:
        raise ValueError("states must be float32 with contiguous [D, D] matrices")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q, k, v must be bf16, fp16 or float32, got {q.dtype}")


def lightning_extend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     qo_indptr: torch.Tensor, qo_indptr_host: list[int],
                     prefix_lens_host: list[int], slopes: torch.Tensor, states: torch.Tensor,
                     state_slots: torch.Tensor, snapshot_every: int = 0,
                     snapshot_slots: torch.Tensor | None = None,
                     config: ExtendConfig = DEFAULT_EXTEND_CONFIG,
                     out: torch.Tensor | None = None,
                     prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Ragged extend; see `attention.linear` for the contract. snapshot_every must be a
    multiple of SNAPSHOT_ALIGN. `prefix_lens`: the same lengths as an int32 device tensor
    (a step's batch has them), else they are copied from the host list: from pageable
    memory, a copy that waits for the stream to drain. `out` [T, H, D] in q's dtype, last
    dim contiguous, is written in place when given."""
    check_extend_args(q, k, v, qo_indptr, qo_indptr_host, prefix_lens_host, slopes, states,
                      state_slots, snapshot_every, snapshot_slots)
    block_v = min(config.block_v, q.shape[2])
    _check_kernel_shapes(q, states, block_v)
    if config.chunk < 16 or SNAPSHOT_ALIGN % config.chunk:
        raise ValueError(f"chunk must be 16, 32 or 64 (divide {SNAPSHOT_ALIGN}), got {config.chunk}")
    if snapshot_every % SNAPSHOT_ALIGN:
        raise ValueError(f"snapshot_every must be a multiple of {SNAPSHOT_ALIGN}, "
                         f"got {snapshot_every}")
    T, H, D = q.shape
    out = check_out(out, q)
    B = len(prefix_lens_host)
    if B == 0:
        return out
    prefix = prefix_lens
    if prefix is None:
        prefix = torch.tensor(prefix_lens_host, dtype=torch.int32).to(q.device, non_blocking=True)
    elif prefix.shape != (B,) or prefix.dtype != torch.int32 or prefix.device != q.device:
        raise ValueError(f"prefix_lens must be int32 [{B}] on {q.device}, got {prefix.dtype} "
                         f"{tuple(prefix.shape)} on {prefix.device}")
    # unread without snapshots; the kernel indexes rows of snap_cols entries
    snaps = snapshot_slots.contiguous() if snapshot_every else state_slots
    grid = (D // block_v, H, B)
    _lightning_extend_kernel[grid](
        q, k, v, out, qo_indptr, prefix, slopes, states, state_slots, snaps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), states.stride(0), states.stride(1),
        snaps.stride(0) if snapshot_every else 0, snapshot_every,
        D=D, CHUNK=config.chunk, BLOCK_V=block_v, HAS_SNAPSHOTS=snapshot_every > 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOTS=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        NUM_STAGES=config.num_stages, num_warps=config.num_warps,
    )
    return out
