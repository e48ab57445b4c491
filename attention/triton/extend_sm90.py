"""Hopper (sm_90) causal prefill/extend attention in Gluon, with wgmma software pipelining.

Same contract as `extend.extend_attention` (see its module docstring) for the case that
matters most on the GPU: softmax attention (plain logits) over the `nhd` or `hnd` layout
with pages of at least one key tile, bf16/fp16, head dim 64 or 128. Everything else stays on
the portable Triton kernel, which `extend.extend_attention` falls back to.

Why a second kernel: per key tile, the Triton kernel waits for q.K^T, then runs the
softmax, then issues P.V; the tensor cores idle while the exponentials run (about half of
each tile's time with head dim 128). Gluon exposes the asynchronous warpgroup MMA and its
wait, so each tile j here goes: issue q.K_j^T, rescale the output rows meanwhile, issue
P_{j-1}.V_{j-1}, wait for the scores only, and run tile j's softmax while that P.V runs
(FlashAttention-3's intra-warpgroup overlap). K/V tiles come in by bulk tensor copies (TMA)
through a ring of NUM_STAGES shared-memory buffers, each with its own arrival barrier. One
program is one warpgroup over 64 query rows; at 112 KB of shared memory two programs share
an SM, so one's softmax also overlaps the other's MMAs (docs/kernels.md has the
measurements behind these choices).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kvcache.layout import KVLayout

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
# Triton 3.6 names the bulk tensor load async_copy_global_to_shared; later versions async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # likewise renamed


@gluon.jit
def _issue_kv_tile(
    tile, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, bt_row, kv_head,
    LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """Start the bulk copies of key tile `tile` (keys tile*BLOCK_N ...) into its ring slot:
    one copy per page the tile spans (a tile may cover several pages, never part of one)."""
    COPY_ROWS: gl.constexpr = k_desc.block_type.shape[0]
    slot = tile % NUM_STAGES
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes * (BLOCK_N // COPY_ROWS))
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes * (BLOCK_N // COPY_ROWS))
    for c in gl.static_range(BLOCK_N // COPY_ROWS):
        start = tile * BLOCK_N + c * COPY_ROWS
        page = gl.load(bt_row + start // PAGE_SIZE)
        if LAYOUT == 0:  # nhd viewed as [pages * page_size, kv_heads * head_dim]
            row = page * PAGE_SIZE + start % PAGE_SIZE
            col = kv_head * HEAD_DIM
        else:  # hnd viewed as [pages * kv_heads * page_size, head_dim]
            row = (page * NUM_KV_HEADS + kv_head) * PAGE_SIZE + start % PAGE_SIZE
            col = 0
        _tma_load(k_desc, [row, col], k_bars.index(slot),
                  k_bufs.index(slot).slice(c * COPY_ROWS, COPY_ROWS))
        _tma_load(v_desc, [row, col], v_bars.index(slot),
                  v_bufs.index(slot).slice(c * COPY_ROWS, COPY_ROWS))


@gluon.jit
def _softmax_tile(s, m_i, l_i, start, q_pos, qk_scale, MASKED: gl.constexpr,
                  S_LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online-softmax step on one tile's scores: the probabilities (unnormalised), the
    running max and sum, and the factor that rescales the output rows."""
    if MASKED:
        k_pos = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        s = gl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _zero_keys_past_end(v_buf, valid, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        num_warps: gl.constexpr):
    """Rows of the last V tile past seq_len may hold stale values or NaN (0 * NaN = NaN in
    P.V): overwrite them with zeros in shared memory before the tensor cores read it."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    v = v_buf.load(layout)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    v = gl.where((rows < valid)[:, None], v, gl.zeros_like(v))
    _cta_barrier()  # every warp has read the tile before any overwrites it
    v_buf.store(v)
    fence_async_shared()  # generic-proxy stores, then tensor-core (async-proxy) reads
    _cta_barrier()


@gluon.jit
def _attend(
    q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc, bt_row, kv_head,
    first_q_pos, seq_len, n_tiles, n_full, qk_scale,
    LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """The KV loop of one program: returns the unnormalised output rows and their softmax
    sums. The ring's first NUM_STAGES tiles are already on their way; a slot is refilled
    as soon as both of its MMAs are done."""
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    dtype: gl.constexpr = q_smem.dtype

    q_pos = first_q_pos + gl.arange(0, BLOCK_M, layout=ROW_S)
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=ROW_S)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_LAYOUT)
    s_init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT)

    # Tile 0's scores and probabilities; then per tile j >= 1: q.K_j^T goes to the tensor
    # cores, the output is rescaled meanwhile, P_{j-1}.V_{j-1} follows, and the softmax of
    # tile j runs while that P.V does. No MMA is in flight across iterations (an accumulator
    # read while its MMA runs makes ptxas serialise every MMA of the kernel).
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_init, use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    if n_full > 0:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, q_pos, qk_scale, False, S_LAYOUT,
                                           BLOCK_N)
    else:
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, q_pos, qk_scale, True, S_LAYOUT,
                                           BLOCK_N)
    p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)

    for j in range(1, n_tiles):
        slot = j % NUM_STAGES
        mbarrier.wait(k_bars.index(slot), (j // NUM_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)), s_init, use_acc=False,
                          is_async=True)
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        prev = (j - 1) % NUM_STAGES
        mbarrier.wait(v_bars.index(prev), ((j - 1) // NUM_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))  # this tile's scores; P.V still running
        if j >= n_full:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, j * BLOCK_N, q_pos, qk_scale, True,
                                               S_LAYOUT, BLOCK_N)
        else:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, j * BLOCK_N, q_pos, qk_scale, False,
                                               S_LAYOUT, BLOCK_N)
        p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        # Tile j-1's slot is free in this warp; the barrier makes it free in all of them
        # before a copy overwrites it.
        refill = j - 1 + NUM_STAGES
        if refill < n_tiles:
            _cta_barrier()
            _issue_kv_tile(refill, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, bt_row,
                           kv_head, LAYOUT, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, BLOCK_N,
                           NUM_STAGES)

    last = n_tiles - 1
    acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
    slot = last % NUM_STAGES
    mbarrier.wait(v_bars.index(slot), (last // NUM_STAGES) & 1)
    if last * BLOCK_N + BLOCK_N > seq_len:
        _zero_keys_past_end(v_bufs.index(slot), seq_len - last * BLOCK_N, BLOCK_N, HEAD_DIM,
                            num_warps)
    acc = warpgroup_mma(p_op, v_bufs.index(slot), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))

    return acc, l_i


# The per-sequence arrays of a mixed step's prefill part are slices whose alignment changes
# from step to step: no specialisation on it (see extend.py).
@gluon.jit(do_not_specialize=["stride_bt", "qo_indptr_ptr", "prefix_lens_ptr", "seq_lens_ptr",
                              "block_table_ptr"])
def _extend_sm90_kernel(
    q_desc, k_desc, v_desc, out_ptr, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr,
    block_table_ptr, stride_ot, stride_oh, stride_bt, qk_scale,
    LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
    HEAD_DIM: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    # The same work mapping as extend._extend_kernel (kept in step by hand: a Gluon kernel
    # cannot call a Triton function): heads vary fastest (the GROUP heads of a KV head share
    # its tiles through L2); the longest (last) query blocks of a sequence start first.
    head = gl.program_id(0)
    q_block = gl.num_programs(1) - 1 - gl.program_id(1)
    seq = gl.program_id(2)
    q_start = gl.load(qo_indptr_ptr + seq)
    q_len = gl.load(qo_indptr_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:
        return
    prefix = gl.load(prefix_lens_ptr + seq)
    seq_len = gl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP
    bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt
    first_q_pos = prefix + q_block * BLOCK_M
    hi = gl.minimum(seq_len, prefix + gl.minimum((q_block + 1) * BLOCK_M, q_len))
    n_tiles = gl.cdiv(hi, BLOCK_N)
    n_full = (first_q_pos + 1) // BLOCK_N  # tiles every row of the block sees whole

    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(
        q_desc, [q_start + q_block * BLOCK_M, head * HEAD_DIM], q_bar, q_smem)
    for i in gl.static_range(NUM_STAGES):  # fill the ring; the loop refills freed slots
        if i < n_tiles:
            _issue_kv_tile(i, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, bt_row, kv_head,
                           LAYOUT, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, NUM_STAGES)

    mbarrier.wait(q_bar, 0)
    acc, l_i = _attend(q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc, bt_row, kv_head,
                       first_q_pos, seq_len, n_tiles, n_full, qk_scale, LAYOUT, PAGE_SIZE,
                       NUM_KV_HEADS, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, num_warps)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    l_o = gl.convert_layout(l_i, ROW_O)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    offs_m = q_block * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROW_O)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    rows = (q_start + offs_m).to(gl.int64)
    ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    gl.store(ptrs, out.to(dtype), mask=(offs_m < q_len)[:, None])


# One warpgroup of 64 query rows, 64-key tiles, three K/V buffers: 112 KB of shared memory,
# so two programs share an SM and one's softmax overlaps the other's MMAs. From the H200
# A/B runs (bench/results/h200-prefill-gluon-ab-2026-12-02*.json): any config needing more
# than half an SM's shared memory (four stages, 128-key tiles) runs one program per SM and
# loses 25-35%; two warpgroups over 128 rows (8 warps) were slower too, and so was a
# producer warp issuing the copies (warp specialisation; the variant is in commit 1043c26).
BLOCK_M = 64
BLOCK_N = 64
NUM_STAGES = 3
NUM_WARPS = 4


def describe(block_n: int = BLOCK_N, num_stages: int = NUM_STAGES, block_m: int = BLOCK_M,
             num_warps: int = NUM_WARPS) -> str:
    return f"gluon-sm90 m{block_m}n{block_n}w{num_warps}s{num_stages}"


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def supports(q: torch.Tensor, layout: KVLayout, variant_name: str,
             block_n: int = BLOCK_N) -> bool:
    """Whether this kernel serves the call (else the portable Triton kernel does). Only the
    built-in plain softmax: user variants are named `module:function`, never "softmax"."""
    return (
        q.is_cuda and _is_hopper(q.device.index if q.device.index is not None else 0)
        and q.dtype in _GL_DTYPES and variant_name == "softmax"
        and layout.name in ("nhd", "hnd")
        and (layout.page_size % block_n == 0 or block_n % layout.page_size == 0)
        and layout.page_size >= 64
        and layout.head_dim in (64, 128) and q.stride(-1) == 1
        and q.stride(1) == layout.head_dim
        # the bulk-copy descriptor of q: 16-byte aligned base and row pitch
        and q.data_ptr() % 16 == 0 and (q.stride(0) * q.element_size()) % 16 == 0
    )


def compile_offline(head_dim: int, layout_name: str = "nhd", num_stages: int = NUM_STAGES,
                    page_size: int = 64, num_kv_heads: int = 8, group: int = 4,
                    block_n: int = BLOCK_N, block_m: int = BLOCK_M,
                    num_warps: int = NUM_WARPS):
    """Build the kernel for sm_90a on a machine without a GPU (CI, PTX inspection) and
    return Triton's compiled kernel. Needs TRITON_INTERPRET unset when the module is
    imported: under the interpreter the reductions Gluon calls are not compilable."""
    from triton.backends.compiler import GPUTarget

    q2 = torch.empty(256, num_kv_heads * group * head_dim, dtype=torch.bfloat16)
    kv = torch.empty(1024, num_kv_heads * head_dim, dtype=torch.bfloat16)
    q_desc = _descriptor(q2, [block_m, head_dim], gl.bfloat16)
    kv_desc = _descriptor(kv, [min(block_n, page_size), head_dim], gl.bfloat16)
    signature = {
        "q_desc": q_desc.__mangle__(), "k_desc": kv_desc.__mangle__(),
        "v_desc": kv_desc.__mangle__(), "out_ptr": "*bf16", "qo_indptr_ptr": "*i32",
        "prefix_lens_ptr": "*i32", "seq_lens_ptr": "*i32", "block_table_ptr": "*i32",
        "stride_ot": "i32", "stride_oh": "i32", "stride_bt": "i32", "qk_scale": "fp32",
    }
    constants = dict(LAYOUT=0 if layout_name == "nhd" else 1, PAGE_SIZE=page_size,
                     NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, GROUP=group,
                     BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=num_stages,
                     num_warps=num_warps)
    signature.update({name: "constexpr" for name in constants})
    source = gluon._runtime.GluonASTSource(_extend_sm90_kernel, signature=signature,
                                           constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def _descriptor(t2d: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
    shared = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), block, shared)


def extend_attention_sm90(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float, max_q_len: int,
    block_n: int = BLOCK_N, num_stages: int = NUM_STAGES, block_m: int = BLOCK_M,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Softmax attention of the new tokens over cached prefix + themselves (see
    `extend.extend_attention`); callers check `supports` first."""
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    assert num_stages >= 2, "the pipeline needs at least two K/V buffers"
    if T == 0 or B == 0 or max_q_len <= 0:
        return out
    dtype = _GL_DTYPES[q.dtype]
    Hkv = layout.num_kv_heads
    q2 = q.as_strided((T, Hq * D), (q.stride(0), 1))
    cols = Hkv * D if layout.name == "nhd" else D
    q_desc = _descriptor(q2, [block_m, D], dtype)
    copy_rows = min(block_n, layout.page_size)  # one bulk copy per page of a tile
    k_desc = _descriptor(k_cache.view(-1, cols), [copy_rows, D], dtype)
    v_desc = _descriptor(v_cache.view(-1, cols), [copy_rows, D], dtype)
    grid = (Hq, triton.cdiv(max_q_len, block_m), B)
    _extend_sm90_kernel[grid](
        q_desc, k_desc, v_desc, out, qo_indptr, prefix_lens, seq_lens, block_table,
        out.stride(0), out.stride(1), block_table.stride(0), float(scale) * 1.4426950408889634,
        LAYOUT=0 if layout.name == "nhd" else 1, PAGE_SIZE=layout.page_size,
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, GROUP=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_STAGES=num_stages, num_warps=num_warps,
    )
    return out
