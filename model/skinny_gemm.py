"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T with M <= 64 rows.

A decode step multiplies a handful of rows by every weight matrix once, so the time is the
weights' bytes over the memory bandwidth; cuBLAS reads them at about 0.8 of the copy
bandwidth at these row counts (docs/kernels.md, skinny GEMM). Here each program streams
one BLOCK_N-row band of W (nn.Linear's [N, K] layout, K contiguous: wide loads) across its
share of K, and W is read exactly once per call.

- M is padded up to BLOCK_M inside the kernel (rows past M load row M - 1 and are not
  stored). With USE_DOT the product is a `tl.dot` (BLOCK_M >= 16); without, it is an
  elementwise multiply-add into a [BLOCK_M, BLOCK_N, BLOCK_K] float32 accumulator reduced
  once at the end (for 1-8 rows, where a padded dot wastes most of its work).
- Rows of W past N are clamped to N - 1 on load (no load mask), masked on store.
- Split-K: when N / BLOCK_N bands are too few to fill the GPU, SPLIT_K programs share a
  band's K range; each writes its float32 partial sums and a second kernel adds the splits
  in a fixed order (deterministic: no atomics, so greedy tokens never change between runs).
- Accumulation is float32; the output has x's dtype; a bias is added in float32.
Nothing on the launch path reads device memory, so calls can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # the most rows the kernel takes; larger M goes to torch
# The CPU interpreter multiplies 16-bit dot operands wrongly (Triton 3.9, docs/kernels.md):
# there the dot takes the (already rounded) operands in float32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split_k: int = 1  # the most K splits; fewer when K is short (`launch_shape`)
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 4

    def label(self) -> str:
        dot = "dot" if self.use_dot else "fma"
        return (f"{dot} n{self.block_n} k{self.block_k} s{self.split_k} "
                f"w{self.num_warps} st{self.num_stages}")


def row_block(m: int, use_dot: bool) -> int:
    """BLOCK_M for m rows: the next power of two, at least 16 for tl.dot."""
    block = triton.next_power_of_2(max(m, 1))
    return max(block, 16) if use_dot else block


# Tuned configs, keyed by (row block, N, K), from `python -m bench.skinny_gemm --sweep` on
# the GPU (docs/kernels.md); shapes not listed use `heuristic_config`.
TUNED: dict[tuple[int, int, int], SkinnyConfig] = {}

FMA_MAX_ROWS = 4  # at most this many rows use the elementwise (non-dot) path by default


@functools.lru_cache(maxsize=1024)  # the LM head asks at every step
def heuristic_config(m: int, n: int, k: int, num_sms: int) -> SkinnyConfig:
    """A launch config from the shape alone: tiles by row block, then K splits enough
    that every SM streams W (`split_for`)."""
    use_dot = m > FMA_MAX_ROWS
    if use_dot:
        block_m = row_block(m, True)
        block_n = 32 if block_m <= 16 else 64
        block_k = 256 if block_m <= 16 else 128
        # shared memory per stage: (BLOCK_M + BLOCK_N) x BLOCK_K x 2 bytes; 3 stages of the
        # larger tiles leave room for two programs an SM
        stages = 4 if block_m <= 16 else 3
    else:
        # the float32 accumulator holds BLOCK_M x BLOCK_N x BLOCK_K: 32-64 registers a
        # thread of 4 warps
        block_n, block_k = 16, max(128, 256 // triton.next_power_of_2(m))
        stages = 3
    split = split_for(n, k, block_n, block_k, num_sms, 1.5 if use_dot else 4.0)
    return SkinnyConfig(block_n, block_k, split, use_dot, num_warps=4, num_stages=stages)


def split_for(n: int, k: int, block_n: int, block_k: int, num_sms: int,
              per_sm: float = 1.5) -> int:
    """K splits (a power of two) for at least `per_sm` programs an SM, each split at least 4
    K-tiles long. The elementwise path wants more programs than tl.dot's: its loads are
    in flight only as far as its warps reach, where tl.dot's are pipelined in shared
    memory."""
    bands = triton.cdiv(n, block_n)
    split = 1
    while bands * split < per_sm * num_sms and k // (2 * split) >= 4 * block_k:
        split *= 2
    return split


def choose_config(m: int, n: int, k: int, num_sms: int) -> SkinnyConfig:
    tuned = TUNED.get((row_block(m, m > FMA_MAX_ROWS), n, k))
    return tuned if tuned is not None else heuristic_config(m, n, k, num_sms)


@functools.lru_cache(maxsize=8)  # asked at every eager call (the LM head's)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: a small grid


def launch_shape(k: int, config: SkinnyConfig) -> tuple[int, int]:
    """(K per split, a multiple of BLOCK_K; number of splits) for a K of `k`."""
    per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    return per_split, triton.cdiv(k, per_split)


@triton.jit(do_not_specialize=["M"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_m = tl.minimum(offs_m, M - 1)  # clamped: loads need no row mask
    rows_n = tl.minimum(offs_n, N - 1)
    k_start = pid_k * K_PER_SPLIT
    k_len = tl.minimum(K_PER_SPLIT, K - k_start)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, k_len, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            inside = (k + offs_k < k_len)[None, :]
            w = tl.load(w_ptrs, mask=inside, other=0.0)
            x = tl.load(x_ptrs, mask=inside, other=0.0)
        if USE_DOT:
            if IEEE:  # float32 inputs, or the interpreter (whose 16-bit dot is wrong)
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    store_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if PARTIAL:
        out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc, mask=store_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit(do_not_specialize=["M"])
def _split_sum_kernel(
    partial_ptr, bias_ptr, out_ptr, M, N, stride_split, stride_pm, stride_om,
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """out[m, n] = sum over s = 0, 1, ... of partial[s, m, n] (+ bias[n]), in that order."""
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + s * stride_split + m * stride_pm + offs, mask=inside,
                       other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


SPLIT_SUM_BLOCK = 1024


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x of 1..MAX_ROWS rows, float32 accumulation."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear wants x [M, K] and weight [N, K]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1..{MAX_ROWS} rows, got {m}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {weight.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("skinny_linear wants a weight whose rows are contiguous")
    config = config or choose_config(m, n, k, num_sms(x.device))
    block_m = row_block(m, config.use_dot)
    if config.use_dot and min(config.block_n, config.block_k) < 16:
        raise ValueError(f"tl.dot needs tiles of at least 16: {config.label()}")
    per_split, splits = launch_shape(k, config)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bands = triton.cdiv(n, config.block_n)
    has_bias = bias is not None
    common = dict(BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  USE_DOT=config.use_dot, EVEN_K=k % config.block_k == 0,
                  IEEE=x.dtype == torch.float32 or _INTERPRETED,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if splits == 1:
        _skinny_gemm_kernel[(bands, 1)](
            x, weight, bias if has_bias else x, out, m, n, k, per_split,
            x.stride(0), weight.stride(0), out.stride(0), 0,
            HAS_BIAS=has_bias, PARTIAL=False, **common)
        return out
    partial = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    _skinny_gemm_kernel[(bands, splits)](
        x, weight, x, partial, m, n, k, per_split,
        x.stride(0), weight.stride(0), partial.stride(1), partial.stride(0),
        HAS_BIAS=False, PARTIAL=True, **common)
    _split_sum_kernel[(triton.cdiv(n, SPLIT_SUM_BLOCK), m)](
        partial, bias if has_bias else partial, out, m, n, partial.stride(0), partial.stride(1),
        out.stride(0), SPLIT_K=splits, BLOCK=SPLIT_SUM_BLOCK, HAS_BIAS=has_bias, num_warps=4)
    return out
