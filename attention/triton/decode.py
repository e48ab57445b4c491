"""Batch decode over a paged KV cache: one query token per sequence, split-KV.

One program handles (sequence b, KV head h, split s). The G query heads of KV head h are
the rows of `tl.dot` (padded to 16, so group sizes 3 or 7 work), and the keys of the split
stream through in tiles of BLOCK_N tokens, each token's page looked up in the block table.
The KV layout is a compile-time parameter of the one kernel source:

  token / nhd / hnd: element = page*s_page + off*s_off + head*s_head + dim
  hnd_x:             element = page*s_page + (off//X)*s_xblk + head*s_head + dim*X + off%X
                     (loaded as [BLOCK_N/X, D, X] tiles, 16-byte rows, then permuted)

With one split the kernel writes the output directly. With several (flash-decoding), each
split writes a partial result: for softmax variants the normalised output and its
log2-sum-exp; for pointwise variants the unnormalised sum and the visible-key count. A
second kernel merges the splits. Nothing on the launch path reads device memory on the
host, so the launches can be captured in a CUDA graph.

On sm_80+ `decode_attention` hands hnd_x to `decode_hndx` (Gluon), which loads the 16-byte
runs straight into mma registers; the merge kernel here serves both.

FP8 caches (e4m3 codes) are dequantized in registers: codes convert exactly to q's dtype
for the dots, and a per-(token, head) scale, when the cache keeps them, multiplies its
key's score column (K) and its key's weight column before P.V (V): the same products as
dequantizing the tiles, for BLOCK_N multiplies a tile instead of BLOCK_N x head_dim.
FP8 calls never go to the Gluon kernel (its operand layouts are for 2-byte elements).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from attention.triton.variants import TritonVariant
from kvcache.layout import HNDX_ID, KVLayout

try:  # Gluon (Triton >= 3.5): the register-direct hnd_x decode kernel
    from attention.triton import decode_hndx
except ImportError:  # pragma: no cover - older Triton: the portable kernel serves hnd_x
    decode_hndx = None


@triton.jit
def _kv_tile(
    cache, table_row, kv_head, start_n, hi,
    s_page, s_off, s_head, s_xblk,
    PAGE_SIZE: tl.constexpr, X: tl.constexpr, LAYOUT_X: tl.constexpr, X_MODE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Tokens [start_n, start_n + BLOCK_N) of one KV head: [BLOCK_N, BLOCK_D], or
    [BLOCK_D, BLOCK_N] when TRANSPOSED. Tokens at or past `hi` read as 0. `start_n` is a
    multiple of BLOCK_N, so the compiler sees runs of X contiguous tokens in hnd_x.

    In hnd_x the load mask is per X-run (whole 16-byte rows): a mask that varies inside a
    row stops the compiler from issuing 16-byte vector loads. A run that straddles `hi`
    lies inside one allocated page, so reading all of it is safe; its tail is masked
    after the load."""
    offs_d = tl.arange(0, BLOCK_D)
    if LAYOUT_X and X_MODE != 0:
        NB: tl.constexpr = BLOCK_N // X
        tok0 = start_n + tl.arange(0, NB) * X  # first token of each X-run (one page each)
        page = tl.load(table_row + tok0 // PAGE_SIZE, mask=tok0 < hi, other=0).to(tl.int64)
        base = page * s_page + ((tok0 % PAGE_SIZE) // X) * s_xblk + kv_head * s_head
        offs_x = tl.arange(0, X)
        if X_MODE == 1:
            # [BLOCK_N/X, D, X] tiles of 16-byte rows, permuted in registers
            ptrs = cache + base[:, None, None] + offs_d[None, :, None] * X + offs_x[None, None, :]
            mask = (tok0 < hi)[:, None, None]
            if HEAD_DIM != BLOCK_D:
                mask = mask & (offs_d[None, :, None] < HEAD_DIM)
            tile = tl.load(ptrs, mask=mask, other=0.0)  # [NB, D, X]
            if TRANSPOSED:
                result = tl.reshape(tl.permute(tile, (1, 0, 2)), (BLOCK_D, BLOCK_N))
            else:
                result = tl.reshape(tl.permute(tile, (0, 2, 1)), (BLOCK_N, BLOCK_D))
        else:
            # [D, BLOCK_N/X, X]: merging the last two dims is a plain reshape to [D, BLOCK_N]
            ptrs = cache + base[None, :, None] + offs_d[:, None, None] * X + offs_x[None, None, :]
            mask = (tok0 < hi)[None, :, None]
            if HEAD_DIM != BLOCK_D:
                mask = mask & (offs_d[:, None, None] < HEAD_DIM)
            tile = tl.reshape(tl.load(ptrs, mask=mask, other=0.0), (BLOCK_D, BLOCK_N))
            if TRANSPOSED:
                result = tile
            else:
                result = tl.trans(tile)
        if not TRANSPOSED:
            # V rows past `hi` inside a loaded X-run hold stale (maybe NaN) values, and
            # 0 * NaN leaks through the dot: zero them. (K needs nothing: its scores there
            # are set to -inf.)
            valid = (start_n + tl.arange(0, BLOCK_N)) < hi
            result = tl.where(valid[:, None], result, 0.0)
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        page = tl.load(table_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        if LAYOUT_X:
            # 2-D gather; contiguous along tokens in runs of X (16 bytes)
            in_page = offs_n % PAGE_SIZE
            base = page * s_page + (in_page // X) * s_xblk + in_page % X + kv_head * s_head
            d_step = X
        else:
            base = page * s_page + (offs_n % PAGE_SIZE) * s_off + kv_head * s_head
            d_step = 1
        if TRANSPOSED:
            ptrs = cache + base[None, :] + offs_d[:, None] * d_step
            mask = mask_n[None, :]
            if HEAD_DIM != BLOCK_D:
                mask = mask & (offs_d[:, None] < HEAD_DIM)
        else:
            ptrs = cache + base[:, None] + offs_d[None, :] * d_step
            mask = mask_n[:, None]
            if HEAD_DIM != BLOCK_D:
                mask = mask & (offs_d[None, :] < HEAD_DIM)
        result = tl.load(ptrs, mask=mask, other=0.0)
    return result


@triton.jit
def _scale_tile(scales, table_row, kv_head, start_n, hi, s_scale_page, s_scale_head,
                PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scales [BLOCK_N] of tokens [start_n, start_n + BLOCK_N) of one KV head ([pages,
    kv_heads, page_size] float32); 0 at or past `hi`."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hi
    page = tl.load(table_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
    return tl.load(scales + page * s_scale_page + kv_head * s_scale_head + offs_n % PAGE_SIZE,
                   mask=mask_n, other=0.0)


# The block-table width changes from step to step: specialising on it would compile new
# instances mid-serving. The split count stays specialised (docs/kernels.md, "Launch
# choices"); warmup_decode compiles its three classes (1, a multiple of 16, other).
@triton.jit(do_not_specialize=["max_splits", "stride_bt"])
def _decode_kernel(
    q_ptr, k_cache, v_cache, block_table, seq_lens, slopes_ptr,
    out_ptr, part_out_ptr, part_stat_ptr, k_scales, v_scales,
    scale, param, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    s_page, s_off, s_head, s_xblk, s_scale_page, s_scale_head,
    max_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, X: tl.constexpr, LAYOUT_X: tl.constexpr, X_MODE: tl.constexpr,
    DIRECT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LOGITS_FN: tl.constexpr, WEIGHT_FN: tl.constexpr, USE_SOFTMAX: tl.constexpr,
    NORMALIZE_BY_VISIBLE: tl.constexpr, HAS_SLOPES: tl.constexpr, KV_SCALES: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    # Each sequence is cut into num_splits ranges of whole tiles.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    q_head = kv_head * GROUP + offs_g
    q_mask = mask_g[:, None]
    if HEAD_DIM != BLOCK_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    compute_ty = q_ptr.dtype.element_ty  # FP8 codes convert to it exactly
    if HAS_SLOPES:
        slope = tl.load(slopes_ptr + q_head, mask=mask_g, other=0.0)[:, None]
    else:
        slope = tl.zeros([GROUP_PAD, 1], dtype=tl.float32)
    q_pos = tl.zeros([GROUP_PAD, 1], dtype=tl.int32) + (seq_len - 1)
    table_row = block_table + b.to(tl.int64) * stride_bt

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for tile in range(lo // BLOCK_N, tl.cdiv(hi, BLOCK_N)):
        start_n = tile * BLOCK_N  # a visible multiple of BLOCK_N (lo is one too)
        k_t = _kv_tile(k_cache, table_row, kv_head, start_n, hi, s_page, s_off, s_head, s_xblk,
                       PAGE_SIZE, X, LAYOUT_X, X_MODE, HEAD_DIM, BLOCK_D, BLOCK_N, True)
        v = _kv_tile(v_cache, table_row, kv_head, start_n, hi, s_page, s_off, s_head, s_xblk,
                     PAGE_SIZE, X, LAYOUT_X, X_MODE, HEAD_DIM, BLOCK_D, BLOCK_N, False)
        s = tl.dot(q, k_t.to(compute_ty), input_precision=DOT_PRECISION) * scale
        if KV_SCALES:
            s = s * _scale_tile(k_scales, table_row, kv_head, start_n, hi, s_scale_page,
                                s_scale_head, PAGE_SIZE, BLOCK_N)[None, :]
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = LOGITS_FN(s, q_pos, offs_n[None, :], slope, param)
        s = tl.where(offs_n[None, :] < hi, s, float("-inf"))
        if USE_SOFTMAX:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
            p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        else:
            visible = s != float("-inf")
            p = tl.where(visible, WEIGHT_FN(s, q_pos, offs_n[None, :], slope, param), 0.0)
            l_i += tl.sum(visible.to(tl.float32), 1)  # visible-key count
        if KV_SCALES:
            p = p * _scale_tile(v_scales, table_row, kv_head, start_n, hi, s_scale_page,
                                s_scale_head, PAGE_SIZE, BLOCK_N)[None, :]
        acc = tl.dot(p.to(compute_ty), v.to(compute_ty), acc, input_precision=DOT_PRECISION)

    if USE_SOFTMAX:
        result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    elif NORMALIZE_BY_VISIBLE and DIRECT_OUT:
        result = acc / tl.maximum(l_i, 1.0)[:, None]
    else:
        result = acc
    out_mask = mask_g[:, None]
    if HEAD_DIM != BLOCK_D:
        out_mask = out_mask & (offs_d[None, :] < HEAD_DIM)
    if DIRECT_OUT:
        tl.store(out_ptr + b * stride_ob + q_head[:, None] * stride_oh + offs_d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials: [B, Hq, max_splits, BLOCK_D] and stats [B, Hq, max_splits], float32
        row = (b * (tl.num_programs(1) * GROUP) + q_head).to(tl.int64) * max_splits + split
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], result,
                 mask=mask_g[:, None])
        if USE_SOFTMAX:
            stat = tl.where(l_i == 0.0, float("-inf"), m_i * 1.4426950408889634 + tl.log2(l_i))
        else:
            stat = l_i
        tl.store(part_stat_ptr + row, stat, mask=mask_g)


@triton.jit(do_not_specialize=["num_splits", "max_splits"])
def _merge_kernel(
    part_out_ptr, part_stat_ptr, out_ptr,
    num_splits, max_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_SOFTMAX: tl.constexpr, NORMALIZE_BY_VISIBLE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b * tl.num_programs(1) + h).to(tl.int64) * max_splits
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    parts = tl.load(part_out_ptr + (row0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                    mask=mask_s[:, None], other=0.0)
    if USE_SOFTMAX:
        lse = tl.load(part_stat_ptr + row0 + offs_s, mask=mask_s, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        total = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    else:
        out = tl.sum(parts, 0)
        if NORMALIZE_BY_VISIBLE:
            count = tl.sum(tl.load(part_stat_ptr + row0 + offs_s, mask=mask_s, other=0.0), 0)
            out = out / tl.maximum(count, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int
    # hnd_x tile load: 0 a 2-D gather, 1 a [N/X, D, X] tile permuted in registers,
    # 2 a [D, N/X, X] tile reshaped to [D, N] (V transposed for the second dot)
    x_mode: int = 2
    # hnd_x on sm_80+: the Gluon kernel of decode_hndx serves every call it supports
    # (one warp per program, so it wants more splits); the others take this kernel
    gluon_hndx: bool = False
    max_splits: int = 64  # a power of two: CUDA-graph mode rounds split counts up to one

    def num_splits(self, batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                   min_tokens_per_split: int = 256) -> int:
        """Splits per sequence for a decode batch, by the heuristic of the kernel used."""
        if self.gluon_hndx:
            return decode_hndx.choose_num_splits(
                batch_size, num_kv_heads, max_seq_len, num_sms, self.max_splits,
                min_tokens_per_split=min_tokens_per_split)
        return choose_num_splits(batch_size, num_kv_heads, max_seq_len, num_sms, self.block_n,
                                 max_splits=self.max_splits,
                                 min_tokens_per_split=min_tokens_per_split)


def gluon_hndx_available(layout: KVLayout, head_dim: int) -> bool:
    """Whether decode_hndx can serve this layout on the current GPU (dtype and group size
    are checked per call)."""
    return (decode_hndx is not None and layout.kernel_id == HNDX_ID and layout.x == decode_hndx.RUN
            and head_dim in (64, 128) and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 8)


def default_decode_config(layout: KVLayout, head_dim: int, on_gpu: bool,
                          allow_gluon: bool = True) -> DecodeConfig:
    """Launch configuration; the CPU interpreter gets small tiles (cheap to emulate, and
    they exercise multi-tile loops)."""
    if not on_gpu:
        return DecodeConfig(block_n=16, num_warps=4, num_stages=1)
    # each choice below is measured in docs/kernels.md, "Launch choices" and "FP8 KV cache"
    if layout.element_bytes == 1:  # FP8 pages (never the Gluon kernel)
        if layout.kernel_id == HNDX_ID:
            return DecodeConfig(block_n=32, num_warps=4, num_stages=2, x_mode=1)
        return DecodeConfig(block_n=128, num_warps=4, num_stages=3)
    if allow_gluon and gluon_hndx_available(layout, head_dim):
        return DecodeConfig(block_n=decode_hndx.BLOCK_N, num_warps=1, num_stages=1,
                            gluon_hndx=True, max_splits=128)
    if head_dim > 128:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    if layout.kernel_id == HNDX_ID:  # [N/X, D, X] tiles of 16-byte rows, permuted for tl.dot
        return DecodeConfig(block_n=32, num_warps=4, num_stages=3, x_mode=1)
    if layout.name == "token":
        return DecodeConfig(block_n=64, num_warps=4, num_stages=3)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=2)


def choose_num_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
    block_n: int, max_splits: int = 64, programs_per_sm: int = 4, min_tokens_per_split: int = 256,
) -> int:
    """Splits per sequence. With at least two programs per SM already (batch x kv_heads),
    none: the merge would cost more than it gains. Otherwise enough splits for
    `programs_per_sm` programs per SM, never cutting a sequence into pieces shorter than
    `min_tokens_per_split` (or one tile)."""
    programs = max(1, batch_size * num_kv_heads)
    if programs >= 2 * num_sms:
        return 1
    want = -(-num_sms * programs_per_sm // programs)
    longest = -(-max_seq_len // max(block_n, min_tokens_per_split))
    return max(1, min(want, longest, max_splits))


def split_targets(out: torch.Tensor, buffers: SplitBuffers | None, num_splits: int,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a split-KV kernel writes its rows of `out` [rows, heads, ...]: `out` itself
    with one split, else `buffers`' partial rows and statistics (grown as needed)."""
    if num_splits == 1:
        return out, out
    if buffers is None:
        buffers = SplitBuffers.empty(out.device)
    buffers.ensure(out.shape[0], out.shape[1], num_splits, width)
    return buffers.part_out, buffers.part_stat


def merge_splits(part_out: torch.Tensor, part_stat: torch.Tensor, out: torch.Tensor,
                 num_splits: int, head_dim: int, block_d: int, uses_softmax: bool = True,
                 normalize_by_visible: bool = False, num_warps: int = 4) -> None:
    """Combine the partial rows of `split_targets` into `out` (log-sum-exp merge)."""
    _merge_kernel[(out.shape[0], out.shape[1])](
        part_out, part_stat, out, num_splits, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        USE_SOFTMAX=uses_softmax, NORMALIZE_BY_VISIBLE=normalize_by_visible,
        num_warps=num_warps,
    )


def graph_num_splits(splits: int) -> int:
    """A split count as CUDA graphs capture it: rounded up to a power of two, so fewer
    distinct counts need a graph."""
    return 1 << (splits - 1).bit_length()


def graph_context_lengths(unit: int, max_model_len: int) -> list[int]:
    """Context lengths that step through every split count a graph can take: the count
    grows with ceil(length / unit) and `graph_num_splits` rounds it to a power of two, so
    lengths unit x 2^k reach each one."""
    lengths = [1]
    while lengths[-1] < max_model_len:
        lengths.append(min(max_model_len, unit * (1 << (len(lengths) - 1))))
    return lengths


@dataclass
class SplitBuffers:
    """Scratch for split-KV partial results, allocated once and grown, never per call."""

    part_out: torch.Tensor  # float32, flat
    part_stat: torch.Tensor
    # Set once CUDA graphs captured these buffers: growing must then keep the old ones
    # alive, since a graph replays with the addresses it was captured with.
    keep_retired: bool = False
    retired: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def empty(cls, device: torch.device) -> SplitBuffers:
        return cls(torch.empty(0, device=device), torch.empty(0, device=device))

    def ensure(self, batch: int, num_q_heads: int, splits: int, block_d: int) -> None:
        rows = batch * num_q_heads * splits
        if self.part_stat.numel() < rows:
            dev = self.part_out.device
            if self.keep_retired:
                self.retired.append((self.part_out, self.part_stat))
            self.part_out = torch.empty(rows * block_d, dtype=torch.float32, device=dev)
            self.part_stat = torch.empty(rows, dtype=torch.float32, device=dev)


_NO_SCALES: dict[torch.device, torch.Tensor] = {}


def no_scales(device: torch.device) -> torch.Tensor:
    """A float32 stand-in for the scale pointers of a launch without scales (never read):
    always the same type, so it adds no kernel instance."""
    if device not in _NO_SCALES:
        _NO_SCALES[device] = torch.ones(1, device=device)
    return _NO_SCALES[device]


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    variant: TritonVariant,
    slopes: torch.Tensor | None,
    num_splits: int,
    buffers: SplitBuffers | None = None,
    config: DecodeConfig | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b] = attention of q[b] [Hq, D] over the first seq_lens[b] tokens of sequence b.

    q, out: [B, Hq, D] (last dim contiguous); block_table [B, max_pages] int32; the query's
    position is seq_lens[b] - 1. `buffers` must hold B x Hq x num_splits partial rows when
    num_splits > 1 (`SplitBuffers.ensure`); pass the same object every step. FP8 caches
    (float8_e4m3fn) take their `k_scales`/`v_scales` ([pages, kv_heads, page_size] float32),
    or none for a scale of 1.0.
    """
    B, Hq, D = q.shape
    if B == 0:
        return out
    block_d = triton.next_power_of_2(D)
    if config is None:
        config = default_decode_config(layout, D, q.is_cuda)
    if variant.needs_slopes and slopes is None:
        raise ValueError(f"variant {variant.name!r} needs per-head slopes")
    part_out, part_stat = split_targets(out, buffers, num_splits, block_d)
    slopes_arg = slopes if (variant.needs_slopes and slopes is not None) else q
    if (k_scales is None) != (v_scales is None):
        raise ValueError("give both K and V scales or neither")
    if k_scales is not None and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("scales go with an FP8 (float8_e4m3fn) cache only")
    if config.gluon_hndx and decode_hndx.supports(q, k_cache, layout):
        decode_hndx.launch(q, k_cache, v_cache, layout, block_table, seq_lens, out, scale,
                           variant, slopes_arg, num_splits, part_out, part_stat)
    else:
        if config.gluon_hndx:  # a call the Gluon kernel does not take (dtype, group size)
            config = default_decode_config(layout, D, q.is_cuda, allow_gluon=False)
        _launch_triton(q, k_cache, v_cache, layout, block_table, seq_lens, slopes_arg, out,
                       part_out, part_stat, scale, variant, num_splits, config,
                       k_scales, v_scales)
    if num_splits > 1:
        merge_splits(part_out, part_stat, out, num_splits, D, block_d, variant.uses_softmax,
                     variant.normalize_by_visible, num_warps=4 if D >= 128 else 2)
    return out


def _launch_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    block_table: torch.Tensor, seq_lens: torch.Tensor, slopes_arg: torch.Tensor,
    out: torch.Tensor, part_out: torch.Tensor, part_stat: torch.Tensor, scale: float,
    variant: TritonVariant, num_splits: int, config: DecodeConfig,
    k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
) -> None:
    B, Hq, D = q.shape
    Hkv = layout.num_kv_heads
    group = Hq // Hkv
    block_d = triton.next_power_of_2(D)
    block_n = config.block_n
    if layout.kernel_id == HNDX_ID:
        block_n = max(block_n, layout.x)
    s_page, s_off, s_head, s_dim, s_xblk = layout.strides()
    s_scale_page, s_scale_head = layout.scale_strides()
    direct = num_splits == 1
    with_scales = k_scales is not None
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, slopes_arg,
        out, part_out, part_stat,
        k_scales if with_scales else no_scales(q.device),
        v_scales if with_scales else no_scales(q.device),
        scale, variant.param, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        s_page, s_off, s_head, s_xblk, s_scale_page, s_scale_head,
        num_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE_SIZE=layout.page_size, X=layout.x, LAYOUT_X=layout.kernel_id == HNDX_ID,
        X_MODE=config.x_mode, DIRECT_OUT=direct, DOT_PRECISION=_dot_precision(q.dtype),
        KV_SCALES=with_scales,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **variant.kernel_args(),
    )


@dataclass
class WarmupInputs:
    """Zero K/V caches of a few pages (and their scales) and one zero query token: the
    smallest launch of a kernel instance, for warm-up."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scales: torch.Tensor | None
    v_scales: torch.Tensor | None


def warmup_inputs(
    layout: KVLayout, num_q_heads: int, dtype: torch.dtype, device: torch.device,
    cache_dtype: torch.dtype | None = None, with_scales: bool = False,
) -> WarmupInputs:
    """`dtype` is q's; `cache_dtype` the pages' (default: q's), with scales when asked."""
    num_pages = 2 if layout.page_size > 1 else 8
    k_cache = torch.zeros(layout.cache_shape(num_pages), dtype=cache_dtype or dtype,
                          device=device)
    q = torch.zeros(1, num_q_heads, layout.head_dim, dtype=dtype, device=device)
    scales = [torch.ones(layout.scale_shape(num_pages), device=device) if with_scales else None
              for _ in range(2)]
    return WarmupInputs(q, k_cache, torch.zeros_like(k_cache), scales[0], scales[1])


def warmup_decode(
    layout: KVLayout, num_q_heads: int, variant: TritonVariant, device: torch.device,
    dtype: torch.dtype, config: DecodeConfig, max_splits: int, buffers: SplitBuffers,
    cache_dtype: torch.dtype | None = None, with_scales: bool = False,
) -> None:
    """Compile every kernel instance a serving step may launch, on a tiny batch, so that no
    step waits on Triton: split counts 1, 2, 4, ... up to `max_splits` cover the decode
    kernel's three split classes (1 with direct output, multiples of 16, others) and one
    merge instance per power-of-two bound on the split count."""
    D = layout.head_dim
    w = warmup_inputs(layout, num_q_heads, dtype, device, cache_dtype, with_scales)
    ints = {"device": device, "dtype": torch.int32}
    table, seq_lens = torch.zeros(1, 1, **ints), torch.ones(1, **ints)
    slopes = torch.zeros(num_q_heads, dtype=torch.float32, device=device)
    splits = 1
    while True:
        decode_attention(w.q, w.k_cache, w.v_cache, layout, table, seq_lens,
                         torch.empty_like(w.q), D**-0.5, variant, slopes, splits, buffers, config,
                         w.k_scales, w.v_scales)
        if splits >= max_splits:
            break
        splits = min(2 * splits, max_splits)
