"""Hopper (sm_90) causal prefill/extend attention in Gluon: warp-specialised, with two
consumer warpgroups in ping-pong and a producer warp.

Same contract as `extend.extend_attention` (see its module docstring) for the case that
matters most on the GPU: softmax attention (plain logits) over the `nhd`, `hnd` or `hnd_x`
layout with pages of at least 64 keys, bf16/fp16, head dim 64 or 128. Everything else stays
on the portable Triton kernel, which `extend.extend_attention` falls back to.

Why a second kernel: per key tile, the Triton kernel waits for q.K^T, then runs the
softmax, then issues P.V; the tensor cores idle while the exponentials run. Gluon exposes
the asynchronous warpgroup MMA, its wait, bulk tensor copies (TMA), mbarriers and warp
specialisation, so the FlashAttention-3 schedule can be written out:
- a work item is 128 query rows of a head: two consumer warpgroups of 64 rows each
  share every K/V tile, and a producer warp keeps a ring of NUM_STAGES K/V buffers full
  (one TMA copy per page of a tile; an `empty` barrier per slot counts both consumers out);
- within a consumer, tile j goes: issue q.K_j^T, rescale the output meanwhile, issue
  P_{j-1}.V_{j-1}, wait for the scores only, run tile j's softmax while that P.V runs;
- between the consumers, "ping-pong": they take turns issuing a round of MMAs (consumer 0,
  then 1, then 0 ...), so one warpgroup's softmax runs while the other's MMAs do. Both run
  the same number of rounds; a consumer with fewer tiles (the lower rows of a causal block
  see fewer keys) keeps taking empty turns and releasing the slots of the tiles it skips;
- persistent: one program per SM walks work items (a head over a 128-row query block),
  longest first; the ring runs on across items and the next item's q loads while the
  current one finishes, so an item's start-up hides under the previous item's tail.
docs/kernels.md has the measurements behind these choices.
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

from attention.variants import Variant
from kvcache.layout import HND_ID, HNDX_ID, NHD_ID, KVLayout

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
# Triton 3.6 names the bulk tensor load async_copy_global_to_shared; later versions async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # likewise renamed

# The kernel's LAYOUT values (KVLayout.kernel_id) as constants jitted code can read.
NHD: gl.constexpr = gl.constexpr(NHD_ID)
HNDX: gl.constexpr = gl.constexpr(HNDX_ID)


@gluon.jit
def _issue_kv_tile(
    tile, slot, k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, bt_row, kv_head, seq_len,
    LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
):
    """Start the bulk copies of key tile `tile` (keys tile*BLOCK_N ...) into ring slot
    `slot`: one copy per page the tile spans, or one copy when the tile lies inside a page."""
    # keys per copy (hnd_x copies count runs of 8 keys)
    COPY_ROWS: gl.constexpr = k_desc.block_type.shape[0] * (8 if LAYOUT == HNDX else 1)
    RUNS: gl.constexpr = COPY_ROWS // 8  # hnd_x: runs of 8 keys per copy
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes * (BLOCK_N // COPY_ROWS))
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes * (BLOCK_N // COPY_ROWS))
    for c in gl.static_range(BLOCK_N // COPY_ROWS):
        start = tile * BLOCK_N + c * COPY_ROWS
        # A copy that starts past the sequence's end (the last tile's second page) reads the
        # last page again rather than a block-table entry past the row: its keys are masked
        # and its values zeroed all the same.
        page = gl.load(bt_row + gl.minimum(start, seq_len - 1) // PAGE_SIZE)
        if LAYOUT == HNDX:
            # hnd_x viewed as [pages * kv_heads * page_size/8, head_dim, 8]: the copy lands
            # verbatim, runs of 8 keys after one another (see _k_operand)
            run = ((page * NUM_KV_HEADS + kv_head) * PAGE_SIZE + start % PAGE_SIZE) // 8
            _tma_load(k_desc, [run, 0, 0], k_bars.index(slot),
                      k_bufs.index(slot).slice(c * RUNS, RUNS))
            _tma_load(v_desc, [run, 0, 0], v_bars.index(slot),
                      v_bufs.index(slot).slice(c * RUNS, RUNS))
        else:
            if LAYOUT == NHD:  # nhd viewed as [pages * page_size, kv_heads * head_dim]
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
def _k_operand(k_buf, LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A ring slot's keys as the K^T [head_dim, keys] operand of q.K^T.

    hnd_x slots hold [keys/8, head_dim, 8]: key n = 8*run + x of dim d at
    run*8*head_dim + 8*d + x. Read as K^T that is wgmma's no-swizzle key-major layout (8 dims
    x 8 keys per 128-byte core matrix, the next dims 128 bytes on, the next run 16*head_dim
    bytes on); the pages are used as stored, with no transpose anywhere."""
    if LAYOUT == HNDX:
        return k_buf.permute((1, 0, 2)).reshape([HEAD_DIM, BLOCK_N])
    else:
        return k_buf.permute((1, 0))


@gluon.jit
def _v_operand(v_buf, LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """A ring slot's values as the V [keys, head_dim] operand of P.V (for hnd_x the same
    bytes as in _k_operand, now the no-swizzle operand whose reduction axis is contiguous)."""
    if LAYOUT == HNDX:
        return v_buf.permute((0, 2, 1)).reshape([BLOCK_N, HEAD_DIM])
    else:
        return v_buf


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
def _take_turn(turn_bars, half: gl.constexpr, rnd):
    """Wait until the other consumer has issued its MMAs of the previous round (consumer 0
    goes first in every round). Rounds are counted over all of a program's work items."""
    if half == 0:
        if rnd > 0:
            mbarrier.wait(turn_bars.index(0), (rnd - 1) & 1)
    else:
        mbarrier.wait(turn_bars.index(1), rnd & 1)


@gluon.jit
def _release(bar):
    _cta_barrier()  # every warp of this consumer is done with the buffer
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _work_item(k, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr, num_seqs, num_q_blocks,
               NUM_HEADS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The k-th work item of this program: a head over a block of 2 * BLOCK_M query rows of
    a sequence. Items run longest first (the last query blocks of every sequence first;
    heads fastest, so the heads of a KV head read its tiles from L2 together) and are dealt
    to the programs in a snake (0 .. G-1, then G-1 .. 0), which evens out their total work.
    Every partition walks the same items; `valid` is false past the end and for blocks
    beyond a sequence's new tokens."""
    G = gl.num_programs(0)
    pid = gl.program_id(0)
    i = k * G + gl.where(k % 2 == 0, pid, G - 1 - pid)
    head = i % NUM_HEADS
    seq = (i // NUM_HEADS) % num_seqs
    q_block = num_q_blocks - 1 - i // (NUM_HEADS * num_seqs)
    q_start = gl.load(qo_indptr_ptr + seq)
    q_len = gl.load(qo_indptr_ptr + seq + 1) - q_start
    prefix = gl.load(prefix_lens_ptr + seq)
    seq_len = gl.load(seq_lens_ptr + seq)
    valid = (q_block >= 0) & (q_block * 2 * BLOCK_M < q_len)
    n0 = _tiles_of_half(0, q_block, prefix, q_len, seq_len, BLOCK_M, BLOCK_N)
    n1 = _tiles_of_half(1, q_block, prefix, q_len, seq_len, BLOCK_M, BLOCK_N)
    return valid, seq, head, q_block, q_start, q_len, prefix, seq_len, n0, n1, gl.maximum(n0, n1)


@gluon.jit
def _walk_length(num_seqs, num_q_blocks, NUM_HEADS: gl.constexpr):
    """How many `_work_item` steps each program takes (the last may be past the end)."""
    return gl.cdiv(num_seqs * num_q_blocks * NUM_HEADS, gl.num_programs(0))


@gluon.jit
def _tiles_of_half(half, q_block, prefix, q_len, seq_len, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr):
    row0 = q_block * 2 * BLOCK_M + half * BLOCK_M
    hi = gl.minimum(seq_len, prefix + gl.minimum(row0 + BLOCK_M, q_len))
    return gl.where(row0 < q_len, gl.cdiv(hi, BLOCK_N), 0)


@gluon.jit
def _attend_rows(
    half: gl.constexpr, q_smem, q_full, q_empty, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
    turn_bars, out_ptr, stride_ot, stride_oh, head, q_block, q_start, q_len, prefix, seq_len,
    n_mine, n_cta, zero_last, qk_scale, tile_base, round_base, item_count,
    LAYOUT: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """One consumer's part of one work item: query rows [64*half, 64*half + 64) of the
    block. Its rounds of MMAs, then its empty rounds, then its output rows. The item's tile
    j sits in ring slot (tile_base + j) % NUM_STAGES; round r is round_base + r."""
    num_warps: gl.constexpr = 4
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    dtype: gl.constexpr = k_bufs.dtype

    row0 = q_block * 2 * BLOCK_M + half * BLOCK_M  # first row of this half in its sequence
    first_q_pos = prefix + row0
    n_full = (first_q_pos + 1) // BLOCK_N
    other_turn = turn_bars.index(1 - half)

    q_pos = first_q_pos + gl.arange(0, BLOCK_M, layout=ROW_S)
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=ROW_S)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=ROW_S)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_LAYOUT)
    s_init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT)
    alpha = gl.full([BLOCK_M], 1.0, gl.float32, layout=ROW_S)
    p_op = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=P_LAYOUT)

    mbarrier.wait(q_full, item_count & 1)
    if n_mine > 0:
        # round 0: tile 0's scores
        g = tile_base
        mbarrier.wait(k_bars.index(g % NUM_STAGES), (g // NUM_STAGES) & 1)
        _take_turn(turn_bars, half, round_base)
        s = warpgroup_mma(q_smem, _k_operand(k_bufs.index(g % NUM_STAGES), LAYOUT, BLOCK_N,
                                             HEAD_DIM), s_init, use_acc=False, is_async=True)
        mbarrier.arrive(other_turn, count=1)
        s = warpgroup_mma_wait(0, deps=(s,))
        if n_mine == 1:  # q's last MMA is done: the producer may load the next item's
            _release(q_empty)
        if n_full > 0:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, q_pos, qk_scale, False,
                                               S_LAYOUT, BLOCK_N)
        else:
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, q_pos, qk_scale, True,
                                               S_LAYOUT, BLOCK_N)
        p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)

        # rounds 1 .. n_mine-1: q.K_j^T and P_{j-1}.V_{j-1}
        for j in range(1, n_mine):
            g = tile_base + j
            slot = g % NUM_STAGES
            prev = (g - 1) % NUM_STAGES
            mbarrier.wait(k_bars.index(slot), (g // NUM_STAGES) & 1)
            mbarrier.wait(v_bars.index(prev), ((g - 1) // NUM_STAGES) & 1)
            _take_turn(turn_bars, half, round_base + j)
            s = warpgroup_mma(q_smem, _k_operand(k_bufs.index(slot), LAYOUT, BLOCK_N, HEAD_DIM),
                              s_init, use_acc=False, is_async=True)
            acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
            acc = warpgroup_mma(p_op, _v_operand(v_bufs.index(prev), LAYOUT, BLOCK_N, HEAD_DIM),
                                acc, is_async=True)
            mbarrier.arrive(other_turn, count=1)
            s = warpgroup_mma_wait(1, deps=(s,))
            if j == n_mine - 1:
                _release(q_empty)
            if j >= n_full:
                p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, j * BLOCK_N, q_pos, qk_scale,
                                                   True, S_LAYOUT, BLOCK_N)
            else:
                p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, j * BLOCK_N, q_pos, qk_scale,
                                                   False, S_LAYOUT, BLOCK_N)
            p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(empty_bars.index(prev))

        # round n_mine: the last P.V
        last = n_mine - 1
        g = tile_base + last
        slot = g % NUM_STAGES
        mbarrier.wait(v_bars.index(slot), (g // NUM_STAGES) & 1)
        _take_turn(turn_bars, half, round_base + n_mine)
        acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
        # Rows past seq_len of the item's last tile: zeroed by the first consumer to use it
        # (consumer 0 reaches any round before consumer 1 does).
        v_last = _v_operand(v_bufs.index(slot), LAYOUT, BLOCK_N, HEAD_DIM)
        if zero_last and last * BLOCK_N + BLOCK_N > seq_len:
            _zero_keys_past_end(v_last, seq_len - last * BLOCK_N, BLOCK_N, HEAD_DIM, num_warps)
        acc = warpgroup_mma(p_op, v_last, acc, is_async=True)
        mbarrier.arrive(other_turn, count=1)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        _release(empty_bars.index(slot))
        first_empty_round = n_mine + 1
    else:
        _release(q_empty)
        first_empty_round = 0

    # Empty rounds keep the turns alternating; round r >= 1 releases skipped tile r - 1
    # (after its copy has landed, so the release counts toward that fill of the slot).
    for r in range(first_empty_round, n_cta + 1):
        _take_turn(turn_bars, half, round_base + r)
        mbarrier.arrive(other_turn, count=1)
        if r >= 1:
            g = tile_base + r - 1
            mbarrier.wait(k_bars.index(g % NUM_STAGES), (g // NUM_STAGES) & 1)
            mbarrier.wait(v_bars.index(g % NUM_STAGES), (g // NUM_STAGES) & 1)
            _release(empty_bars.index(g % NUM_STAGES))

    l_o = gl.convert_layout(l_i, ROW_O)
    out = acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]
    offs_m = row0 + gl.arange(0, BLOCK_M, layout=ROW_O)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
    rows = (q_start + offs_m).to(gl.int64)
    ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    gl.store(ptrs, out.to(dtype), mask=(offs_m < q_len)[:, None])


@gluon.jit
def _consumer(
    half: gl.constexpr, q_bufs, q_full, q_empty, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
    turn_bars, out_ptr, stride_ot, stride_oh, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr,
    num_seqs, num_q_blocks, qk_scale,
    LAYOUT: gl.constexpr, NUM_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
):
    """A consumer warpgroup's walk over its program's work items."""
    tile_base = 0
    round_base = 0
    item_count = 0
    for k in range(_walk_length(num_seqs, num_q_blocks, NUM_HEADS)):
        valid, seq, head, q_block, q_start, q_len, prefix, seq_len, n0, n1, n_cta = _work_item(
            k, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr, num_seqs, num_q_blocks,
            NUM_HEADS, BLOCK_M, BLOCK_N)
        if valid:
            if half == 0:
                n_mine = n0
                zero_last = n0 == n_cta
            else:
                n_mine = n1
                zero_last = n0 < n_cta
            _attend_rows(half, q_bufs.index(half), q_full, q_empty, k_bufs, v_bufs, k_bars,
                         v_bars, empty_bars, turn_bars, out_ptr, stride_ot, stride_oh, head,
                         q_block, q_start, q_len, prefix, seq_len, n_mine, n_cta, zero_last,
                         qk_scale, tile_base, round_base, item_count, LAYOUT, HEAD_DIM,
                         BLOCK_M, BLOCK_N, NUM_STAGES)
            tile_base += n_cta
            round_base += n_cta + 1
            item_count += 1


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, q_full, q_empty, k_bufs, v_bufs, k_bars, v_bars,
              empty_bars, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr, block_table_ptr,
              stride_bt, num_seqs, num_q_blocks,
              LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
              NUM_HEADS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """One warp loading every work item's q (once both consumers are done with the last
    item's) and keeping the K/V ring full across items: ring fill g waits until both
    consumers have released fill g - NUM_STAGES."""
    GROUP: gl.constexpr = NUM_HEADS // NUM_KV_HEADS
    tile_base = 0
    item_count = 0
    for k in range(_walk_length(num_seqs, num_q_blocks, NUM_HEADS)):
        valid, seq, head, q_block, q_start, q_len, prefix, seq_len, n0, n1, n_cta = _work_item(
            k, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr, num_seqs, num_q_blocks,
            NUM_HEADS, BLOCK_M, BLOCK_N)
        if valid:
            if item_count > 0:
                mbarrier.wait(q_empty, (item_count - 1) & 1)
            mbarrier.expect(q_full, 2 * q_desc.block_type.nbytes)
            for h in gl.static_range(2):
                _tma_load(q_desc, [q_start + q_block * 2 * BLOCK_M + h * BLOCK_M,
                                   head * HEAD_DIM], q_full, q_bufs.index(h))
            bt_row = block_table_ptr + seq.to(gl.int64) * stride_bt
            for t in range(n_cta):
                g = tile_base + t
                if g >= NUM_STAGES:
                    mbarrier.wait(empty_bars.index(g % NUM_STAGES), (g // NUM_STAGES - 1) & 1)
                _issue_kv_tile(t, g % NUM_STAGES, k_desc, v_desc, k_bufs, v_bufs, k_bars,
                               v_bars, bt_row, head // GROUP, seq_len, LAYOUT, PAGE_SIZE,
                               NUM_KV_HEADS, HEAD_DIM, BLOCK_N)
            tile_base += n_cta
            item_count += 1


# The per-sequence arrays of a mixed step's prefill part are slices whose alignment changes
# from step to step: no specialisation on it (see extend.py).
@gluon.jit(do_not_specialize=["stride_bt", "qo_indptr_ptr", "prefix_lens_ptr", "seq_lens_ptr",
                              "block_table_ptr", "num_seqs", "num_q_blocks"])
def _extend_sm90_kernel(
    q_desc, k_desc, v_desc, out_ptr, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr,
    block_table_ptr, stride_ot, stride_oh, stride_bt, qk_scale, num_seqs, num_q_blocks,
    LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr, NUM_KV_HEADS: gl.constexpr,
    HEAD_DIM: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    # Persistent: one program per SM walks work items (see _work_item), so the next item's
    # q and first K/V tiles load while the current one finishes.
    NUM_HEADS: gl.constexpr = NUM_KV_HEADS * GROUP
    dtype: gl.constexpr = q_desc.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    if LAYOUT == HNDX:  # hnd_x: a slot holds [keys/8, head_dim, 8] as the pages store it
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N // 8, HEAD_DIM, 8],
                                           k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N // 8, HEAD_DIM, 8],
                                           v_desc.layout)
    else:
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM],
                                           k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM],
                                           v_desc.layout)
    q_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_full, count=1)
    mbarrier.init(q_empty, count=2)  # one release per consumer
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
        mbarrier.init(empty_bars.index(i), count=2)
    mbarrier.init(turn_bars.index(0), count=1)
    mbarrier.init(turn_bars.index(1), count=1)
    fence_async_shared()

    gl.warp_specialize(
        [(_consumer, (0, q_bufs, q_full, q_empty, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                      turn_bars, out_ptr, stride_ot, stride_oh, qo_indptr_ptr, prefix_lens_ptr,
                      seq_lens_ptr, num_seqs, num_q_blocks, qk_scale, LAYOUT, NUM_HEADS,
                      HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES)),
         (_consumer, (1, q_bufs, q_full, q_empty, k_bufs, v_bufs, k_bars, v_bars, empty_bars,
                      turn_bars, out_ptr, stride_ot, stride_oh, qo_indptr_ptr, prefix_lens_ptr,
                      seq_lens_ptr, num_seqs, num_q_blocks, qk_scale, LAYOUT, NUM_HEADS,
                      HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES)),
         (_producer, (q_desc, k_desc, v_desc, q_bufs, q_full, q_empty, k_bufs, v_bufs, k_bars,
                      v_bars, empty_bars, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr,
                      block_table_ptr, stride_bt, num_seqs, num_q_blocks, LAYOUT, PAGE_SIZE,
                      NUM_KV_HEADS, NUM_HEADS, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# hnd_x builds (tests/attention/test_extend_sm90_build.py) but is served here only once its
# numerics have been checked on a Hopper GPU; until then it stays on the portable kernel.
HNDX_ON_GPU = False

# Two consumer warpgroups of 64 query rows (an item covers 128), 128-key tiles, three K/V
# buffers: 32 KB of q + 3 x 64 KB = 224 KB of shared memory, one program per SM; 240 + 240
# + 24 registers per thread fill the register file. Measured against the alternatives in
# docs/kernels.md ("Launch choices").
BLOCK_M = 64  # rows per consumer warpgroup
BLOCK_N = 128
NUM_STAGES = 3
CONSUMER_REGS = 240  # per thread of a consumer warpgroup (setmaxnreg)
PRODUCER_REGS = 24


def describe(block_n: int = BLOCK_N, num_stages: int = NUM_STAGES) -> str:
    return f"gluon-sm90 pingpong m{2 * BLOCK_M}n{block_n}s{num_stages}"


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else 0)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def supports(q: torch.Tensor, layout: KVLayout, variant: Variant,
             block_n: int = BLOCK_N, other_dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    """Whether this kernel serves the call (else the portable Triton kernel does). Only
    softmax over plain logits (no variant hook here; a user's transform modifies logits).
    `other_dtypes` (the caches', the output's) must all be q's: one dtype runs throughout.
    Pages of at least 64 keys: nhd or hnd (token is nhd with pages of one key)."""
    return (
        q.is_cuda and _is_hopper(q.device.index if q.device.index is not None else 0)
        and q.dtype in _GL_DTYPES and variant.uses_softmax and not variant.modifies_logits
        and all(dtype == q.dtype for dtype in other_dtypes)
        and (layout.kernel_id in (NHD_ID, HND_ID) or (layout.kernel_id == HNDX_ID and HNDX_ON_GPU))
        and (layout.page_size % block_n == 0 or block_n % layout.page_size == 0)
        and layout.page_size >= 64
        and layout.head_dim in (64, 128) and q.stride(-1) == 1
        and q.stride(1) == layout.head_dim
        # the bulk-copy descriptor of q: 16-byte aligned base and row pitch
        and q.data_ptr() % 16 == 0 and (q.stride(0) * q.element_size()) % 16 == 0
    )


def compile_offline(head_dim: int, layout_name: str = "nhd", num_stages: int = NUM_STAGES,
                    page_size: int = 64, num_kv_heads: int = 8, group: int = 4,
                    block_n: int = BLOCK_N):
    """Build the kernel for sm_90a on a machine without a GPU (CI, PTX inspection) and
    return Triton's compiled kernel. Needs TRITON_INTERPRET unset when the module is
    imported: under the interpreter the reductions Gluon calls are not compilable."""
    from triton.backends.compiler import GPUTarget

    q2 = torch.empty(256, num_kv_heads * group * head_dim, dtype=torch.bfloat16)
    layout = KVLayout.create(layout_name, page_size, num_kv_heads, head_dim, "torch.bfloat16")
    kv = torch.empty(layout.cache_shape(1024 // page_size), dtype=torch.bfloat16)
    q_desc = _descriptor(q2, [BLOCK_M, head_dim], gl.bfloat16)
    kv_desc = _kv_descriptor(kv, layout, block_n, gl.bfloat16)
    signature = {
        "q_desc": _mangle(q_desc), "k_desc": _mangle(kv_desc),
        "v_desc": _mangle(kv_desc), "out_ptr": "*bf16", "qo_indptr_ptr": "*i32",
        "prefix_lens_ptr": "*i32", "seq_lens_ptr": "*i32", "block_table_ptr": "*i32",
        "stride_ot": "i32", "stride_oh": "i32", "stride_bt": "i32", "qk_scale": "fp32",
        "num_seqs": "i32", "num_q_blocks": "i32",
    }
    constants = dict(LAYOUT=layout.kernel_id, PAGE_SIZE=page_size,
                     NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, GROUP=group,
                     BLOCK_M=BLOCK_M, BLOCK_N=block_n, NUM_STAGES=num_stages,
                     CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS)
    signature.update({name: "constexpr" for name in constants})
    source = gluon._runtime.GluonASTSource(_extend_sm90_kernel, signature=signature,
                                           constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _mangle(desc: TensorDescriptor) -> str:
    """A descriptor's signature type (Triton 3.6 has no `__mangle__` yet)."""
    if hasattr(desc, "__mangle__"):
        return desc.__mangle__()
    from triton.runtime.jit import mangle_type

    return mangle_type(desc)


def _descriptor(t: torch.Tensor, block: list[int], dtype) -> TensorDescriptor:
    shared = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, shared)


def _kv_descriptor(cache: torch.Tensor, layout: KVLayout, block_n: int,
                   dtype) -> TensorDescriptor:
    """The bulk-copy descriptor of a K or V cache: one copy per page of a key tile (or one
    per tile inside a page). nhd and hnd copy [keys, head_dim] rows; hnd_x copies
    [keys/8, head_dim, 8], its pages' own order (no swizzle: 16-byte rows)."""
    copy_rows = min(block_n, layout.page_size)
    D = layout.head_dim
    view = cache.view(-1, *layout.key_rows_view())
    if layout.kernel_id == HNDX_ID:
        return _descriptor(view, [copy_rows // layout.x, D, layout.x], dtype)
    return _descriptor(view, [copy_rows, D], dtype)


def extend_attention_sm90(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float, max_q_len: int,
    block_n: int = BLOCK_N, num_stages: int = NUM_STAGES,
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
    q_desc = _descriptor(q2, [BLOCK_M, D], dtype)
    k_desc = _kv_descriptor(k_cache, layout, block_n, dtype)
    v_desc = _kv_descriptor(v_cache, layout, block_n, dtype)
    num_q_blocks = triton.cdiv(max_q_len, 2 * BLOCK_M)
    grid = (min(_num_sms(q.device), Hq * num_q_blocks * B),)
    _extend_sm90_kernel[grid](
        q_desc, k_desc, v_desc, out, qo_indptr, prefix_lens, seq_lens, block_table,
        out.stride(0), out.stride(1), block_table.stride(0), float(scale) * 1.4426950408889634,
        B, num_q_blocks,
        LAYOUT=layout.kernel_id, PAGE_SIZE=layout.page_size,
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, GROUP=Hq // Hkv, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        NUM_STAGES=num_stages, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
        num_warps=4,
    )
    return out
