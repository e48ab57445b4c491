"""Triton MLA attention over the paged latent cache, absorbed: decode and prefill/extend.

Rows of a program are (query token, head) pairs of one sequence, BLOCK_M of them: for a
decode they are the heads of the request, so every head is a row of one `tl.dot` against
the same cached rows; for a prefill/extend chunk they run token-major over the chunk. Each
key tile is loaded once per program as [BLOCK_N, rank] (latent, the value and the first
part of the key) plus [rope, BLOCK_N] (the rotary key):

    s = q_lat . c^T + q_pe . k_pe^T          acc += softmax(s) . c

Split-KV (flash-decoding): program (sequence, row block, split) covers whole tiles of the
split's key range and writes its normalised output and log2-sum-exp; the merge kernel of
attention/triton/decode.py combines the splits. The launch reads nothing from the device
on the host, and the split count is a host decision (a CUDA-graph key).

Prefill/extend is absorbed too (one kernel for both phases): per key it costs
rows x (2 x rank + rope) multiply-adds against (qk_nope + rope + v) per head when the
latent is expanded to per-head K/V, about 3.4x more for DeepSeek's shapes, in exchange for
reading 576 values per key instead of 16 x 320 (docs/kernels.md, "MLA").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attention.triton.decode import SplitBuffers, merge_splits, split_targets

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_splits", "max_splits", "stride_bt"])
def _mla_attention_kernel(
    q_ptr, cache_ptr, block_table, qo_indptr, seq_lens,
    out_ptr, part_out_ptr, part_stat_ptr,
    scale_log2, num_splits, max_splits,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, stride_slot,
    NUM_HEADS: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr,
):
    b = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: no qo_indptr read (CUDA graphs replay seq_lens only)
        q_start = b
        q_len = 1
    else:
        q_start = tl.load(qo_indptr + b)
        q_len = tl.load(qo_indptr + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    prefix = seq_len - q_len
    num_rows = q_len * NUM_HEADS

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    tok = rows // NUM_HEADS
    head = rows % NUM_HEADS
    q_pos = prefix + tok

    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    # causal: no row of this block sees past its last token; an empty block sees nothing
    last_tok = (tl.minimum(row_block * BLOCK_M + BLOCK_M, num_rows) - 1) // NUM_HEADS
    hi = tl.minimum(hi, prefix + last_tok + 1)
    hi = tl.where(row_block * BLOCK_M < num_rows, hi, lo)

    offs_c = tl.arange(0, RANK)
    offs_r = tl.arange(0, ROPE)
    q_row = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q_lat = tl.load(q_ptr + q_row[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_ptr + q_row[:, None] + RANK + offs_r[None, :], mask=row_ok[:, None],
                   other=0.0)
    table_row = block_table + b.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, RANK], dtype=tl.float32)
    for tile in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(table_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + offs_n % PAGE_SIZE
        # keys past `hi` read as 0: finite, whatever the cache holds there
        c = tl.load(cache_ptr + slot[:, None] * stride_slot + offs_c[None, :],
                    mask=n_ok[:, None], other=0.0)  # [BLOCK_N, RANK]
        # row-major like the cache (coalesced), transposed in registers for the dot
        k_pe = tl.load(cache_ptr + slot[:, None] * stride_slot + RANK + offs_r[None, :],
                       mask=n_ok[:, None], other=0.0)  # [BLOCK_N, ROPE]
        s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=DOT_PRECISION) * scale_log2
        visible = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        acc = tl.dot(p.to(c.dtype), c, acc, input_precision=DOT_PRECISION)

    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DIRECT_OUT:
        out_row = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + out_row[:, None] + offs_c[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partials [T, H, max_splits, RANK] and log2-sum-exp [T, H, max_splits], float32
        prow = ((q_start + tok) * NUM_HEADS + head).to(tl.int64) * max_splits + split
        tl.store(part_out_ptr + prow[:, None] * RANK + offs_c[None, :], result,
                 mask=row_ok[:, None])
        stat = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_stat_ptr + prow, stat, mask=row_ok)


@dataclass(frozen=True)
class MLAKernelConfig:
    block_m: int  # (token, head) rows per program
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    max_splits: int = 64

    @classmethod
    def for_device(cls, num_heads: int, on_gpu: bool) -> MLAKernelConfig:
        """Small tiles under the CPU interpreter (cheap, and several tiles per split); on a
        GPU the heads of a decode fill up to 64 rows, so 128 heads read each key tile in two
        programs, not eight."""
        if not on_gpu:
            return cls(block_m=16, block_n=16, num_warps=4, num_stages=1)
        if num_heads <= 16:
            return cls(block_m=16, block_n=64, num_warps=4, num_stages=2)
        # 64 keys a tile at 128 heads: faster than 32 on the H100 (docs/kernels.md, "MLA")
        return cls(block_m=64, block_n=64, num_warps=8, num_stages=2)


def choose_num_splits(num_seqs: int, num_heads: int, max_seq_len: int, num_sms: int,
                      config: MLAKernelConfig, min_tokens_per_split: int = 256) -> int:
    """Decode splits per sequence: enough programs for four per SM, never pieces shorter
    than `min_tokens_per_split`; none when the batch alone fills the device."""
    programs = max(1, num_seqs * -(-num_heads // config.block_m))
    if programs >= 2 * num_sms:
        return 1
    want = -(-num_sms * 4 // programs)
    longest = -(-max_seq_len // max(config.block_n, min_tokens_per_split))
    return max(1, min(want, longest, config.max_splits))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def mla_attention(
    q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int, qo_indptr: torch.Tensor | None,
    seq_lens: torch.Tensor, block_table: torch.Tensor, out: torch.Tensor, scale: float,
    max_q_len: int, num_splits: int = 1, buffers: SplitBuffers | None = None,
    config: MLAKernelConfig | None = None,
) -> torch.Tensor:
    """out[t, h] = softmax(scale * q[t, h] . K^T) . V over sequence b's first
    seq_lens[b] - q_len_b + j + 1 cached rows (causal), for token t = qo_indptr[b] + j.

    qo_indptr None: a decode batch, token b is sequence b's one query.
    q [T, H, rank + rope] (last dim contiguous), cache [pages, page_size, rank + rope]
    (K = the whole row, V = its first `rank` columns), out [T, H, rank]. With
    num_splits > 1, `buffers` holds T x H x num_splits partial rows (grown here)."""
    T, H, width = q.shape
    rope = width - kv_lora_rank
    B = seq_lens.shape[0]
    if T == 0:
        return out
    for n, what in ((kv_lora_rank, "kv_lora_rank"), (rope, "rope dim")):
        if n & (n - 1):
            raise ValueError(f"the MLA kernel needs a power-of-two {what}, got {n}")
    if config is None:
        config = MLAKernelConfig.for_device(H, q.is_cuda)
    page_size = cache.shape[1]
    direct = num_splits == 1
    part_out, part_stat = split_targets(out, buffers, num_splits, kv_lora_rank)
    row_blocks = triton.cdiv(max_q_len * H, config.block_m)
    decode = qo_indptr is None
    if decode and (T != B or max_q_len != 1):
        raise ValueError("without qo_indptr every sequence has exactly one query")
    _mla_attention_kernel[(B, row_blocks, num_splits)](
        q, cache, block_table, seq_lens if decode else qo_indptr, seq_lens, out, part_out, part_stat,
        scale * LOG2E, num_splits, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        cache.stride(1),
        NUM_HEADS=H, RANK=kv_lora_rank, ROPE=rope, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, PAGE_SIZE=page_size, DIRECT_OUT=direct,
        DOT_PRECISION=_dot_precision(q.dtype), DECODE=decode,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not direct:
        merge_splits(part_out, part_stat, out, num_splits, kv_lora_rank, kv_lora_rank)
    return out
