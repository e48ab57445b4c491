"""Batched lightning-attention decode in Triton: decay, rank-1 update and output in one pass.

One program per (sequence, head, block of value columns) reads its float32 state slice
[D, BLOCK_V] once, in row blocks of BLOCK_K, writes S' = exp(-lam) S + k^T v back to the
same place and accumulates o = q S' from the registers: the state is read once and
written once, which is the whole memory traffic that matters (docs/kernels.md).
Nothing depends on values on the host, so the launch can be captured in a CUDA graph;
padded rows may all point at one scratch slot (their results are garbage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attention.linear.args import check_out, check_qkv, check_states
from attention.linear.extend import _check_kernel_shapes


@dataclass(frozen=True)
class DecodeConfig:
    block_v: int = 64  # value columns a program owns
    block_k: int = 64  # state rows loaded at a time (divides head_dim)
    num_warps: int = 4


DEFAULT_DECODE_CONFIG = DecodeConfig()


@triton.jit
def _lightning_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr, states_ptr, state_slots_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    stride_slot, stride_head,
    D: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(state_slots_ptr + b).to(tl.int64)
    decay = tl.exp(-tl.load(slopes_ptr + h))
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_v).to(tl.float32)
    base = states_ptr + slot * stride_slot + h * stride_head
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kk = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k).to(tl.float32)
        qq = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_k).to(tl.float32)
        ptrs = base + offs_k[:, None] * D + offs_v[None, :]
        S = tl.load(ptrs) * decay + kk[:, None] * v[None, :]
        tl.store(ptrs, S)
        acc += tl.sum(qq[:, None] * S, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_v, acc.to(out_ptr.dtype.element_ty))


def lightning_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                     states: torch.Tensor, state_slots: torch.Tensor,
                     config: DecodeConfig = DEFAULT_DECODE_CONFIG,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v [B, H, D] one token per sequence; updates states[state_slots] in place;
    writes `out` in place when given."""
    check_qkv(q, k, v)
    check_states(states, slopes, q.shape[1], q.shape[2])
    B, H, D = q.shape
    block_v, block_k = min(config.block_v, D), min(config.block_k, D)
    _check_kernel_shapes(q, states, block_v)
    if D % block_k:
        raise ValueError(f"block_k {block_k} must divide head_dim {D}")
    out = check_out(out, q)
    if B == 0:
        return out
    _lightning_decode_kernel[(B, H, D // block_v)](
        q, k, v, out, slopes, states, state_slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), states.stride(0), states.stride(1),
        D=D, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=config.num_warps,
    )
    return out
