"""Batch decode for the `hnd_x` layout without tensor cores (CUDA-core FMAs).

In hnd_x a page holds, per KV head, runs of X tokens stored as [head_dim, X] (16-byte rows
of X consecutive tokens). `tl.dot` needs K^T as [head_dim, tokens], which from these runs
takes a register permute (a shared-memory round trip) on every tile. Decode has a few
query rows per KV head, so the arithmetic is small next to the bytes read; this kernel
keeps the runs as loaded, [runs, head_dim, X], and reduces with broadcast products:

  scores[g, r, x] = sum_d q[g, d] * K[r, d, x]              (a reduction over head_dim)
  acc[g, r, d]   += sum_x p[g, r, x] * V[r, d, x]            (a reduction inside a row)

Each of the R = BLOCK_N / X run slots of a tile keeps its own running max and sum (slot r
sees runs r, r + R, r + 2R, ... of the split), so no tile needs a reduction across slots;
the slots are merged by log-sum-exp once, at the end. Splits, outputs and the partial
results for the merge kernel are those of attention/triton/decode.py.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_hndx_fma_kernel(
    q_ptr, k_cache, v_cache, block_table, seq_lens, slopes_ptr,
    out_ptr, part_out_ptr, part_stat_ptr,
    scale, param, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    s_page, s_head, s_xblk,
    max_splits,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, X: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    LOGITS_FN: tl.constexpr, WEIGHT_FN: tl.constexpr, USE_SOFTMAX: tl.constexpr,
    NORMALIZE_BY_VISIBLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
):
    R: tl.constexpr = BLOCK_N // X  # runs per tile
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, R)
    offs_x = tl.arange(0, X)
    mask_g = offs_g < GROUP
    q_head = kv_head * GROUP + offs_g
    q_mask = mask_g[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0).to(tl.float32)
    q4 = q[:, None, :, None]  # [G, 1, D, 1]
    if HAS_SLOPES:
        slope = tl.load(slopes_ptr + q_head, mask=mask_g, other=0.0)[:, None, None]
    else:
        slope = tl.zeros([GROUP_P2, 1, 1], dtype=tl.float32)
    q_pos = tl.zeros([GROUP_P2, 1, 1], dtype=tl.int32) + (seq_len - 1)
    table_row = block_table + b.to(tl.int64) * stride_bt
    d_in = (offs_d < HEAD_DIM)[None, :, None]

    m_i = tl.full([GROUP_P2, R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P2, R], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, R, BLOCK_D], dtype=tl.float32)
    for tile in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        tok0 = tile * BLOCK_N + offs_r * X  # first token of each run
        run_in = tok0 < hi
        page = tl.load(table_row + tok0 // PAGE_SIZE, mask=run_in, other=0).to(tl.int64)
        base = page * s_page + ((tok0 % PAGE_SIZE) // X) * s_xblk + kv_head * s_head
        ptrs = base[:, None, None] + offs_d[None, :, None] * X + offs_x[None, None, :]
        # whole 16-byte rows: a run that straddles `hi` lies in one allocated page
        mask = run_in[:, None, None] & d_in
        k = tl.load(k_cache + ptrs, mask=mask, other=0.0).to(tl.float32)  # [R, D, X]
        v = tl.load(v_cache + ptrs, mask=mask, other=0.0).to(tl.float32)
        valid_rx = (tok0[:, None] + offs_x[None, :]) < hi  # [R, X]
        k_pos = (tok0[:, None] + offs_x[None, :])[None, :, :]  # [1, R, X]
        valid = valid_rx[None, :, :]
        s = tl.sum(q4 * k[None, :, :, :], axis=2) * scale  # [G, R, X]
        s = LOGITS_FN(s, q_pos, k_pos, slope, param)
        s = tl.where(valid, s, float("-inf"))
        if USE_SOFTMAX:
            m_new = tl.maximum(m_i, tl.max(s, 2))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
            p = tl.exp2((s - m_safe[:, :, None]) * 1.4426950408889634)
            l_i = l_i * alpha + tl.sum(p, 2)
            acc = acc * alpha[:, :, None]
            m_i = m_new
        else:
            visible = s != float("-inf")
            p = tl.where(visible, WEIGHT_FN(s, q_pos, k_pos, slope, param), 0.0)
            l_i += tl.sum(visible.to(tl.float32), 2)
        # stale values past `hi` inside a run: p is 0 there, but 0 * NaN is NaN
        v = tl.where(valid_rx[:, None, :], v, 0.0)
        acc += tl.sum(p[:, :, None, :] * v[None, :, :, :], axis=3)  # [G, R, D]

    # merge the run slots
    if USE_SOFTMAX:
        m = tl.max(m_i, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2((m_i - m_safe[:, None]) * 1.4426950408889634)  # 0 for empty slots
        l_tot = tl.sum(l_i * w, 1)
        o = tl.sum(acc * w[:, :, None], 1)
        m_i_tot = m
    else:
        l_tot = tl.sum(l_i, 1)
        o = tl.sum(acc, 1)
        m_i_tot = l_tot  # unused
    if USE_SOFTMAX:
        result = o / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None]
    elif NORMALIZE_BY_VISIBLE and DIRECT_OUT:
        result = o / tl.maximum(l_tot, 1.0)[:, None]
    else:
        result = o
    out_mask = mask_g[:, None] & (offs_d[None, :] < HEAD_DIM)
    if DIRECT_OUT:
        tl.store(out_ptr + b * stride_ob + q_head[:, None] * stride_oh + offs_d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (b * (tl.num_programs(1) * GROUP) + q_head).to(tl.int64) * max_splits + split
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], result,
                 mask=mask_g[:, None])
        if USE_SOFTMAX:
            stat = tl.where(l_tot == 0.0, float("-inf"),
                            m_i_tot * 1.4426950408889634 + tl.log2(l_tot))
        else:
            stat = l_tot
        tl.store(part_stat_ptr + row, stat, mask=mask_g)
