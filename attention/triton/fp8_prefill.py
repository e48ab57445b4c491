"""FP8 pages for the Hopper prefill kernel: dequantize a prefill step's K/V into a 16-bit
scratch cache, then run `extend_sm90` on it.

The Gluon kernel feeds its tensor-core dots from shared memory in 2-byte types only, so
FP8 pages would otherwise go to the portable kernel, which does the same work at a
fraction of the Hopper kernel's rate. Dequantizing costs one pass over the keys (1-byte
read, 2-byte write, per layer), while attention's work grows with queries x keys: the
pass pays when chunks are long (`worth_it`), and short extends over a long prefix stay on
the portable kernel, which reads the codes directly.

The scratch is one hnd cache of pages of `SCRATCH_PAGE` keys, rectangular: sequence b owns
pages [b * W, (b + 1) * W), W enough for the widest block-table row, so its block table
is built from shapes alone (no host sync). Keys past a sequence's length are written as
zeros, so a tile straddling the end reads finite values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attention.triton.decode import _kv_tile, _scale_tile, no_scales
from kvcache.layout import HNDX_ID, KVLayout

SCRATCH_PAGE = 128  # one page per tile of the Hopper kernel (its BLOCK_N)
# Dequantizing pays once a sequence brings this many queries per key tile on average
# (the arithmetic is in docs/kernels.md, "FP8 KV cache").
MIN_QUERIES_PER_SEQ = 128
MAX_SCRATCH_BYTES = 1 << 30  # K and V scratch together; larger steps take the portable kernel


@triton.jit
def _dequantize_kernel(
    cache, scales, block_table, seq_lens, out,
    stride_bt, s_page, s_off, s_head, s_xblk, s_scale_page, s_scale_head, scratch_width,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, X: tl.constexpr, LAYOUT_X: tl.constexpr,
    SCRATCH: tl.constexpr, KV_SCALES: tl.constexpr,
):
    """Scratch page j of sequence b, KV head h: keys [j * SCRATCH, (j + 1) * SCRATCH),
    code x scale in out's dtype (zeros past the sequence's length)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    table_row = block_table + b.to(tl.int64) * stride_bt
    start = j * SCRATCH
    tile = _kv_tile(cache, table_row, h, start, seq_len, s_page, s_off, s_head, s_xblk,
                    PAGE_SIZE, X, LAYOUT_X, 1, HEAD_DIM, BLOCK_D, SCRATCH, False)
    rows = tile.to(tl.float32)
    if KV_SCALES:
        rows = rows * _scale_tile(scales, table_row, h, start, seq_len, s_scale_page,
                                  s_scale_head, PAGE_SIZE, SCRATCH)[:, None]
    page = (b * scratch_width + j).to(tl.int64)
    offs_t = tl.arange(0, SCRATCH)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = out + ((page * NUM_KV_HEADS + h) * SCRATCH + offs_t[:, None]) * HEAD_DIM \
        + offs_d[None, :]
    tl.store(ptrs, rows.to(out.dtype.element_ty), mask=offs_d[None, :] < HEAD_DIM)


def scratch_layout(layout: KVLayout, dtype: torch.dtype) -> KVLayout:
    """The scratch's layout: hnd, pages of SCRATCH_PAGE keys, `dtype` elements."""
    return KVLayout.create("hnd", SCRATCH_PAGE, layout.num_kv_heads, layout.head_dim,
                           str(dtype))


def scratch_width(layout: KVLayout, block_table: torch.Tensor) -> int:
    """Scratch pages per sequence: enough for a full block-table row."""
    return -(-block_table.shape[1] * layout.page_size // SCRATCH_PAGE)


def scratch_bytes(layout: KVLayout, block_table: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of the K and V scratch for a step with this block table."""
    tokens = block_table.shape[0] * scratch_width(layout, block_table) * SCRATCH_PAGE
    return 2 * tokens * layout.num_kv_heads * layout.head_dim * dtype.itemsize


def worth_it(num_queries: int, layout: KVLayout, block_table: torch.Tensor,
             dtype: torch.dtype) -> bool:
    """Whether a prefill step (its shapes only) should dequantize for the Hopper kernel."""
    num_seqs = block_table.shape[0]
    return (num_seqs > 0 and num_queries >= MIN_QUERIES_PER_SEQ * num_seqs
            and scratch_bytes(layout, block_table, dtype) <= MAX_SCRATCH_BYTES)


def dequantize_pages(
    cache: torch.Tensor, scales: torch.Tensor | None, layout: KVLayout,
    block_table: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype,
) -> torch.Tensor:
    """The sequences' keys (or values) of an FP8 `cache` as a scratch cache of
    `scratch_layout(layout, dtype)`, sequence b on pages [b * W, (b + 1) * W)."""
    B = block_table.shape[0]
    width = scratch_width(layout, block_table)
    out = torch.empty(scratch_layout(layout, dtype).cache_shape(B * width), dtype=dtype,
                      device=cache.device)
    s_page, s_off, s_head, _, s_xblk = layout.strides()
    s_scale_page, s_scale_head = layout.scale_strides()
    _dequantize_kernel[(B, width, layout.num_kv_heads)](
        cache, scales if scales is not None else no_scales(cache.device), block_table, seq_lens,
        out,
        block_table.stride(0), s_page, s_off, s_head, s_xblk, s_scale_page, s_scale_head, width,
        NUM_KV_HEADS=layout.num_kv_heads, HEAD_DIM=layout.head_dim,
        BLOCK_D=triton.next_power_of_2(layout.head_dim), PAGE_SIZE=layout.page_size,
        X=layout.x, LAYOUT_X=layout.kernel_id == HNDX_ID, SCRATCH=SCRATCH_PAGE,
        KV_SCALES=scales is not None, num_warps=4,
    )
    return out


def scratch_block_table(block_table: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """Row b: scratch pages b * W ... (b + 1) * W - 1."""
    B, width = block_table.shape[0], scratch_width(layout, block_table)
    return torch.arange(B * width, dtype=torch.int32, device=block_table.device).view(B, width)
