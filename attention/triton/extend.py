"""Triton batch prefill/extend attention over a paged KV cache.

    extend_attention(q, k_cache, v_cache, layout, qo_indptr, prefix_lens, seq_lens,
                     block_table, out, scale, variant, max_q_len, alibi_slopes=None) -> out

- q [T, Hq, D]: the new query tokens of B sequences, ragged: rows qo_indptr[b]:qo_indptr[b+1]
  belong to sequence b (qo_indptr [B+1] int32, on the device).
- k_cache / v_cache: one layer's paged K and V in `layout` (token, nhd, hnd or hnd_x; see
  kvcache/layout.py). The new tokens' K/V are ALREADY stored there: the kernel reads the
  whole KV of a sequence (cached prefix + new tokens) through its block table row.
- prefix_lens [B] int32: tokens cached before this step; seq_lens [B] int32: prefix + new.
  Query token i of sequence b sits at absolute position prefix_lens[b] + i and sees the keys
  at positions <= its own (causal). A whole prompt is the case prefix_lens[b] == 0.
- block_table [B, max_pages] int32: page ids (for `token`, page size 1: slot ids).
- out [T, Hq, D]: written in place (every row of every head) and returned.
- scale: the softmax scale; variant: an `attention.variants.Variant` (built-in or a user's
  `module:function` Triton transform); alibi_slopes [Hq] float32 (needed by alibi only;
  computed from the head count when None).
- max_q_len: the longest new-token run in the batch, a host int (sizes the grid without a
  device sync).

One kernel source serves every layout (the layout is a compile-time constant), GQA (the
query heads of a KV group read the same K/V tiles, scheduled side by side for L2 reuse),
any head dim (padded to a power of two) and every variant (the transform is a constexpr
jitted function from attention/triton/variants.py: one kernel instance per variant). The
KV loop of a query block is split in two: keys every query row of the block may see (no
mask computed, no bounds checks) and the diagonal tiles that need the causal mask.

FP8 pages (float8_e4m3fn codes, `k_scales`/`v_scales` [pages, kv_heads, page_size] float32
or none for a scale of 1.0) are dequantized in registers as in decode.py: the codes convert
exactly to q's dtype, a key's scale multiplies its score column and its weight column
before P.V. The Gluon sm90 kernel takes one dtype throughout, so FP8 calls run here.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from attention.triton import fp8_prefill
from attention.triton.decode import no_scales, warmup_inputs
from attention.triton.extend_config import ExtendConfig, extend_config
from attention.triton.variants import identity, triton_variant
from attention.variants import Variant, alibi_slopes
from kvcache.layout import HND_ID, NHD_ID, KVLayout

try:  # Gluon's Hopper API (Triton >= 3.5); without it every call takes the portable kernel
    from attention.triton import extend_sm90
except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton build
    extend_sm90 = None

logger = logging.getLogger(__name__)
# Set when the Gluon kernel failed to build or launch here (another Triton build, a driver
# without what it needs): every later call takes the portable kernel instead.
_sm90_unavailable: str | None = None

# The kernels' LAYOUT values (KVLayout.kernel_id) as constants jitted code can read; any
# other value is hnd_x.
NHD: tl.constexpr = tl.constexpr(NHD_ID)
HND: tl.constexpr = tl.constexpr(HND_ID)


@triton.jit
def _kv_tile_offsets(
    start, seq_len, bt_row, kv_head, offs_d,
    MASKED: tl.constexpr, LAYOUT: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, X: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_PER_TILE: tl.constexpr,
):
    """Element offsets [BLOCK_N, BLOCK_D] of keys start..start+BLOCK_N of one KV head."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if PAGE_PER_TILE:  # the tile lies inside one page: one page-id load per tile
        page = tl.load(bt_row + start // PAGE_SIZE).to(tl.int64)
        in_page = (start % PAGE_SIZE) + tl.arange(0, BLOCK_N)
        page_base = page * (PAGE_SIZE * NUM_KV_HEADS * HEAD_DIM)
    else:  # a page id per key (page size 1, or tiles spanning pages)
        if MASKED:
            pages = tl.load(bt_row + offs_n // PAGE_SIZE, mask=offs_n < seq_len, other=0)
        else:
            pages = tl.load(bt_row + offs_n // PAGE_SIZE)
        in_page = offs_n % PAGE_SIZE
        page_base = pages.to(tl.int64)[:, None] * (PAGE_SIZE * NUM_KV_HEADS * HEAD_DIM)
    if LAYOUT == NHD:  # [pages, page_size, kv_heads, head_dim]
        row = in_page * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
        offs = row[:, None] + offs_d[None, :]
    elif LAYOUT == HND:  # [pages, kv_heads, page_size, head_dim]
        row = kv_head * (PAGE_SIZE * HEAD_DIM) + in_page * HEAD_DIM
        offs = row[:, None] + offs_d[None, :]
    else:  # [pages, kv_heads, page_size / x, head_dim, x]
        row = kv_head * (PAGE_SIZE * HEAD_DIM) + (in_page // X) * (HEAD_DIM * X) + in_page % X
        offs = row[:, None] + offs_d[None, :] * X
    return page_base + offs, offs_n


@triton.jit
def _load_kv(
    start, seq_len, bt_row, k_ptr, v_ptr, k_desc, v_desc, kv_head, offs_d, d_mask,
    MASKED: tl.constexpr, LAYOUT: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, X: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_PER_TILE: tl.constexpr, PAD_D: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_DIAG: tl.constexpr,
):
    """K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] of keys start..start+BLOCK_N."""
    if USE_TMA and (TMA_DIAG or not MASKED):
        # Bulk tensor copies of a [BLOCK_N, HEAD_DIM] tile inside one page; the caches are
        # viewed as 2-D [rows, cols] (see _tma_descriptors).
        page = tl.load(bt_row + start // PAGE_SIZE)
        if LAYOUT == NHD:
            row = page * PAGE_SIZE + start % PAGE_SIZE
            col = kv_head * HEAD_DIM
        else:
            row = (page * NUM_KV_HEADS + kv_head) * PAGE_SIZE + start % PAGE_SIZE
            col = 0
        k = k_desc.load([row, col])
        v = v_desc.load([row, col])
        if MASKED:  # rows past seq_len may hold stale or NaN values: 0 * NaN would leak
            v = tl.where(((start + tl.arange(0, BLOCK_N)) < seq_len)[:, None], v, 0.0)
    else:
        offs, offs_n = _kv_tile_offsets(
            start, seq_len, bt_row, kv_head, offs_d, MASKED, LAYOUT, PAGE_SIZE, NUM_KV_HEADS,
            HEAD_DIM, X, BLOCK_N, PAGE_PER_TILE,
        )
        if MASKED:  # keys past seq_len may be stale or NaN: load zeros there
            kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
        elif PAD_D:
            k = tl.load(k_ptr + offs, mask=d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + offs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptr + offs)
            v = tl.load(v_ptr + offs)
    return tl.trans(k), v


@triton.jit
def _load_scales(
    start, seq_len, bt_row, k_scales, v_scales, kv_head,
    MASKED: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_PER_TILE: tl.constexpr,
):
    """The FP8 scales [BLOCK_N] of keys start..start+BLOCK_N of one KV head (K and V);
    [pages, kv_heads, page_size] float32, so a tile's scales are contiguous in its page."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if PAGE_PER_TILE:
        page = tl.load(bt_row + start // PAGE_SIZE).to(tl.int64)
        offs = page * (NUM_KV_HEADS * PAGE_SIZE) + kv_head * PAGE_SIZE + (
            (start % PAGE_SIZE) + tl.arange(0, BLOCK_N))
    else:
        if MASKED:
            pages = tl.load(bt_row + offs_n // PAGE_SIZE, mask=offs_n < seq_len, other=0)
        else:
            pages = tl.load(bt_row + offs_n // PAGE_SIZE)
        offs = pages.to(tl.int64) * (NUM_KV_HEADS * PAGE_SIZE) + kv_head * PAGE_SIZE + (
            offs_n % PAGE_SIZE)
    if MASKED:  # past seq_len: 0, which zeroes those keys' weights (and their stale V)
        valid = offs_n < seq_len
        return (tl.load(k_scales + offs, mask=valid, other=0.0),
                tl.load(v_scales + offs, mask=valid, other=0.0))
    return tl.load(k_scales + offs), tl.load(v_scales + offs)


@triton.jit
def _update(
    acc, l_i, m_i, qk, v, v_scale, start, q_pos, slope, qk_scale, scale, param,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, LOGITS_FN: tl.constexpr,
    WEIGHT_FN: tl.constexpr, USE_SOFTMAX: tl.constexpr, LOGITS_IS_IDENTITY: tl.constexpr,
    KV_SCALES: tl.constexpr,
):
    """Fold one tile's scores qk = q.K^T and values into the running (acc, l_i, m_i)."""
    k_pos = (start + tl.arange(0, BLOCK_N))[None, :]
    if USE_SOFTMAX:  # online softmax in the log2 domain (exp2)
        if LOGITS_IS_IDENTITY and not MASKED:
            # max(qk) * c == max(qk * c) for c > 0; qk * c - m fuses into one FMA
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        else:
            if LOGITS_IS_IDENTITY:
                s = qk * qk_scale
            else:
                s = LOGITS_FN(qk * scale, q_pos, k_pos, slope, param) * 1.4426950408889634
            if MASKED:
                s = tl.where(k_pos <= q_pos, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        s = qk * scale
        if not LOGITS_IS_IDENTITY:
            s = LOGITS_FN(s, q_pos, k_pos, slope, param)
        p = WEIGHT_FN(s, q_pos, k_pos, slope, param)
        if MASKED:
            p = tl.where(k_pos <= q_pos, p, 0.0)
    if KV_SCALES:  # FP8: each key's V scale on its weight column (l_i took the weights)
        p = p * v_scale[None, :]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _tile(
    q, start, seq_len, bt_row, k_ptr, v_ptr, k_desc, v_desc, k_scales, v_scales, kv_head,
    offs_d, d_mask,
    MASKED: tl.constexpr, LAYOUT: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, X: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_PER_TILE: tl.constexpr, PAD_D: tl.constexpr,
    USE_TMA: tl.constexpr, TMA_DIAG: tl.constexpr, KV_SCALES: tl.constexpr,
):
    """Scores q.K^T [BLOCK_M, BLOCK_N] of one tile (K scales applied), its V in q's dtype
    and its V scales (1.0 without scales)."""
    k_t, v = _load_kv(start, seq_len, bt_row, k_ptr, v_ptr, k_desc, v_desc, kv_head, offs_d,
                      d_mask, MASKED, LAYOUT, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, X, BLOCK_N,
                      PAGE_PER_TILE, PAD_D, USE_TMA, TMA_DIAG)
    qk = tl.dot(q, k_t.to(q.dtype))
    v_scale = 1.0
    if KV_SCALES:
        k_scale, v_scale = _load_scales(start, seq_len, bt_row, k_scales, v_scales, kv_head,
                                        MASKED, PAGE_SIZE, NUM_KV_HEADS, BLOCK_N, PAGE_PER_TILE)
        qk = qk * k_scale[None, :]
    return qk, v.to(q.dtype), v_scale


# The per-sequence arrays of a mixed step's prefill part are slices that start after the
# decodes, so their 16-byte alignment changes from step to step: specialising on it would
# compile new kernel instances mid-serving.
@triton.jit(do_not_specialize=["stride_bt", "param", "window", "qo_indptr_ptr",
                               "prefix_lens_ptr", "seq_lens_ptr", "block_table_ptr"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, out_ptr, qo_indptr_ptr, prefix_lens_ptr, seq_lens_ptr,
    block_table_ptr, slopes_ptr, k_scales, v_scales,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, scale, param, window,
    LAYOUT: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, X: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_PER_TILE: tl.constexpr,
    LOGITS_FN: tl.constexpr, WEIGHT_FN: tl.constexpr, USE_SOFTMAX: tl.constexpr,
    NORMALIZE_BY_VISIBLE: tl.constexpr, HAS_SLOPES: tl.constexpr,
    LOGITS_IS_IDENTITY: tl.constexpr, WINDOW_SKIP: tl.constexpr, USE_TMA: tl.constexpr,
    TMA_DIAG: tl.constexpr, KV_SCALES: tl.constexpr,
):
    # Heads vary fastest so the GROUP heads of a KV head run side by side (K/V from L2);
    # the last (longest, for causal) query blocks start first for a balanced tail.
    head = tl.program_id(0)
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + seq)
    q_len = tl.load(qo_indptr_ptr + seq + 1) - q_start
    if q_block * BLOCK_M >= q_len:
        return
    prefix = tl.load(prefix_lens_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    q_pos = (prefix + offs_m)[:, None]
    if HAS_SLOPES:
        slope = tl.load(slopes_ptr + head)
    else:
        slope = 0.0

    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    # Keys below `full_end` are visible to every row of the block; the rest need the mask.
    first_q_pos = prefix + q_block * BLOCK_M
    hi = tl.minimum(seq_len, prefix + tl.minimum((q_block + 1) * BLOCK_M, q_len))
    full_end = ((first_q_pos + 1) // BLOCK_N) * BLOCK_N
    lo = 0
    if WINDOW_SKIP:  # sliding window: skip tiles that are out of every row's window
        lo = tl.maximum(first_q_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    diag_start = tl.maximum(full_end, lo)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # a finite start for the running max: a fully masked tile then gives p = 0, not NaN
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    qk_scale = scale * 1.4426950408889634
    for start in tl.range(lo, full_end, BLOCK_N):
        qk, v, v_scale = _tile(q, start, seq_len, bt_row, k_ptr, v_ptr, k_desc, v_desc,
                               k_scales, v_scales, kv_head, offs_d, d_mask, False, LAYOUT,
                               PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, X, BLOCK_N, PAGE_PER_TILE,
                               PAD_D, USE_TMA, TMA_DIAG, KV_SCALES)
        acc, l_i, m_i = _update(acc, l_i, m_i, qk, v, v_scale, start, q_pos, slope,
                                qk_scale, scale, param, False, BLOCK_N, LOGITS_FN, WEIGHT_FN,
                                USE_SOFTMAX, LOGITS_IS_IDENTITY, KV_SCALES)
    for start in tl.range(diag_start, hi, BLOCK_N):
        qk, v, v_scale = _tile(q, start, seq_len, bt_row, k_ptr, v_ptr, k_desc, v_desc,
                               k_scales, v_scales, kv_head, offs_d, d_mask, True, LAYOUT,
                               PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM, X, BLOCK_N, PAGE_PER_TILE,
                               PAD_D, USE_TMA, TMA_DIAG, KV_SCALES)
        acc, l_i, m_i = _update(acc, l_i, m_i, qk, v, v_scale, start, q_pos, slope, qk_scale,
                                scale, param, True, BLOCK_N, LOGITS_FN, WEIGHT_FN, USE_SOFTMAX,
                                LOGITS_IS_IDENTITY, KV_SCALES)

    if USE_SOFTMAX:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    elif NORMALIZE_BY_VISIBLE:  # causal: query at position p sees p + 1 keys
        acc = acc / (q_pos + 1).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def _uses_sm90(config: ExtendConfig, q: torch.Tensor, layout: KVLayout, variant: Variant,
               other_dtypes: tuple[torch.dtype, ...] = ()) -> bool:
    """Whether a call with this config goes to the Gluon Hopper kernel (`other_dtypes`: the
    caches' and the output's, when known)."""
    return (config.hopper and extend_sm90 is not None and _sm90_unavailable is None
            and extend_sm90.supports(q, layout, variant, other_dtypes=other_dtypes))


def kernel_name(config: ExtendConfig, q: torch.Tensor, layout: KVLayout,
                variant: Variant, block_table: torch.Tensor | None = None) -> str:
    """The kernel and launch config a call with `config` runs (for benchmark reports);
    FP8 layouts need the call's `block_table` (the dequantizing path depends on it)."""
    if layout.element_bytes == 1:  # FP8 pages
        if block_table is not None and _fp8_scratch(q, layout, block_table, variant) is not None:
            return "fp8 dequantize + " + extend_sm90.describe()
        return f"triton {config}"
    if _uses_sm90(config, q, layout, variant):
        return extend_sm90.describe()
    return f"triton {config}"


def _disable_sm90(exc: Exception) -> None:
    global _sm90_unavailable
    _sm90_unavailable = f"{type(exc).__name__}: {exc}"
    logger.warning("the Gluon sm90 extend kernel failed here (%s); using the Triton kernel "
                   "for every extend call from now on", _sm90_unavailable)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _capability(device: torch.device) -> int | None:
    if device.type != "cuda" or _interpreting():
        return None
    return torch.cuda.get_device_capability(device)[0]


def default_config(head_dim: int, device: torch.device, layout_name: str = "nhd") -> ExtendConfig:
    """The table config on `device` (small tiles under the interpreter)."""
    return extend_config(head_dim, _capability(device), layout_name)


def warmup_extend(
    layout: KVLayout, num_q_heads: int, variant: Variant, device: torch.device,
    dtype: torch.dtype, cache_dtype: torch.dtype | None = None, with_scales: bool = False,
) -> None:
    """Compile the table config of this layout/head dim/variant on a tiny batch, so that no
    serving step waits on Triton compilation (`dtype` q's, `cache_dtype` the pages')."""
    D = layout.head_dim
    w = warmup_inputs(layout, num_q_heads, dtype, device, cache_dtype, with_scales)
    ints = {"device": device, "dtype": torch.int32}
    extend_attention_with_config(
        w.q, w.k_cache, w.v_cache, layout, torch.tensor([0, 1], **ints),
        torch.tensor([0], **ints), torch.tensor([1], **ints), torch.ones(1, 1, **ints),
        torch.empty_like(w.q), D**-0.5, variant, 1, None, default_config(D, device, layout.name),
        w.k_scales, w.v_scales,
    )
    if cache_dtype == torch.float8_e4m3fn and dtype in (torch.bfloat16, torch.float16):
        # a chunk long enough for the dequantize + Hopper kernel path (fp8_prefill)
        n = fp8_prefill.MIN_QUERIES_PER_SEQ
        pages = -(-n // layout.page_size)
        k_cache = torch.zeros(layout.cache_shape(pages + 1), dtype=cache_dtype, device=device)
        scales = (torch.ones(layout.scale_shape(pages + 1), device=device) if with_scales
                  else None)
        q = torch.zeros(n, num_q_heads, D, dtype=dtype, device=device)
        extend_attention_with_config(
            q, k_cache, torch.zeros_like(k_cache), layout, torch.tensor([0, n], **ints),
            torch.tensor([0], **ints), torch.tensor([n], **ints),
            torch.arange(1, pages + 1, **ints).view(1, pages), torch.empty_like(q), D**-0.5,
            variant, n, None, default_config(D, device, layout.name), scales, scales,
        )


def extend_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float, variant: Variant,
    max_q_len: int, alibi_slopes: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over cached prefix + themselves (module docstring)."""
    config = default_config(q.shape[-1], q.device, layout.name)
    return extend_attention_with_config(
        q, k_cache, v_cache, layout, qo_indptr, prefix_lens, seq_lens, block_table, out,
        scale, variant, max_q_len, alibi_slopes, config, k_scales, v_scales,
    )


_slopes_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _slopes_for(num_heads: int, device: torch.device) -> torch.Tensor:
    key = (num_heads, device)
    if key not in _slopes_cache:
        _slopes_cache[key] = alibi_slopes(num_heads).to(device=device, dtype=torch.float32)
    return _slopes_cache[key]


def _tma_descriptors(k_cache, v_cache, layout: KVLayout, block_n: int):
    """Bulk-copy descriptors of [block_n, head_dim] tiles over 2-D views of the caches:
    nhd as [pages * page_size, kv_heads * head_dim], hnd as [pages * kv_heads * page_size,
    head_dim]; a tile never crosses a page (page_size % block_n == 0)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    D = layout.head_dim
    descs = []
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *layout.key_rows_view())
        descs.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block_n, D]))
    return descs[0], descs[1]


def _fp8_scratch(q: torch.Tensor, layout: KVLayout, block_table: torch.Tensor,
                 variant: Variant, out_dtype: torch.dtype | None = None) -> KVLayout | None:
    """The scratch layout when a call on FP8 pages goes through the dequantize + Hopper
    path: a 16-bit q, chunks long enough to pay for the pass, and the Hopper kernel serving
    the scratch (hnd whatever the pages' layout, so its table config decides); else None."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return None
    scratch = fp8_prefill.scratch_layout(layout, q.dtype)
    scratch_config = default_config(layout.head_dim, q.device, scratch.name)
    others = (q.dtype, q.dtype) + ((out_dtype,) if out_dtype is not None else ())
    if fp8_prefill.worth_it(q.shape[0], layout, block_table, q.dtype) and _uses_sm90(
            scratch_config, q, scratch, variant, others):
        return scratch
    return None


def _fp8_on_sm90(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float, variant: Variant,
    max_q_len: int, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
) -> bool:
    """FP8 pages through the Hopper kernel on a dequantized scratch (fp8_prefill), when
    `_fp8_scratch` takes the call; False when it is left to the portable kernel."""
    scratch = _fp8_scratch(q, layout, block_table, variant, out.dtype)
    if scratch is None:
        return False
    k_rows = fp8_prefill.dequantize_pages(k_cache, k_scales, layout, block_table, seq_lens,
                                          q.dtype)
    v_rows = fp8_prefill.dequantize_pages(v_cache, v_scales, layout, block_table, seq_lens,
                                          q.dtype)
    try:
        extend_sm90.extend_attention_sm90(
            q, k_rows, v_rows, scratch, qo_indptr, prefix_lens, seq_lens,
            fp8_prefill.scratch_block_table(block_table, layout), out, scale, max_q_len,
        )
    except Exception as exc:  # raised while building or launching, before any write
        _disable_sm90(exc)
        return False
    return True


def extend_attention_with_config(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: KVLayout,
    qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, seq_lens: torch.Tensor,
    block_table: torch.Tensor, out: torch.Tensor, scale: float, variant: Variant,
    max_q_len: int, alibi_slopes: torch.Tensor | None, config: ExtendConfig,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`extend_attention` with explicit block sizes (for the benchmark's sweep)."""
    T, Hq, D = q.shape
    Hkv = layout.num_kv_heads
    if D != layout.head_dim or Hq % Hkv != 0:
        raise ValueError(
            f"q [T, {Hq}, {D}] does not fit layout {layout.describe()} with {Hkv} KV heads"
        )
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a contiguous last (head_dim) dimension")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the K/V caches must be contiguous tensors in their layout")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("give both K and V scales or neither")
    if k_scales is not None and k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError("scales go with an FP8 (float8_e4m3fn) cache only")
    B = seq_lens.shape[0]
    if T == 0 or B == 0 or max_q_len <= 0:
        return out
    tv = triton_variant(variant)
    if k_cache.dtype == torch.float8_e4m3fn:
        if _fp8_on_sm90(q, k_cache, v_cache, layout, qo_indptr, prefix_lens, seq_lens,
                        block_table, out, scale, variant, max_q_len, k_scales, v_scales):
            return out
    if _uses_sm90(config, q, layout, variant, (k_cache.dtype, v_cache.dtype, out.dtype)):
        try:
            return extend_sm90.extend_attention_sm90(
                q, k_cache, v_cache, layout, qo_indptr, prefix_lens, seq_lens, block_table,
                out, scale, max_q_len,
            )
        except Exception as exc:  # raised while building or launching, before any write
            _disable_sm90(exc)
    # Always a float32 tensor, read only by alibi: the pointer's type is part of the kernel
    # instance, so a stand-in of another type would compile (and warm up) another instance.
    slopes = alibi_slopes if alibi_slopes is not None else _slopes_for(Hq, q.device)
    page_size = layout.page_size
    # sliding_window masks keys with q_pos - k_pos >= window; whole tiles below are skipped
    window = variant.window
    block_d = max(16, triton.next_power_of_2(D))
    # FP8 pages take pointer loads (the bulk-copy path is untried with 1-byte tiles)
    use_tma = (config.tma and layout.kernel_id in (NHD_ID, HND_ID)
               and page_size % config.block_n == 0 and block_d == D
               and k_cache.dtype != torch.float8_e4m3fn)
    k_desc, v_desc = _tma_descriptors(k_cache, v_cache, layout, config.block_n) if use_tma else (
        None, None)
    grid = (Hq, triton.cdiv(max_q_len, config.block_m), B)
    _extend_kernel[grid](
        q, k_cache, v_cache, k_desc, v_desc, out, qo_indptr, prefix_lens, seq_lens,
        block_table, slopes,
        k_scales if k_scales is not None else no_scales(q.device),
        v_scales if v_scales is not None else no_scales(q.device),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        float(scale), tv.param, window or 0,
        LAYOUT=layout.kernel_id, PAGE_SIZE=page_size, NUM_KV_HEADS=Hkv,
        HEAD_DIM=D, BLOCK_D=block_d, X=layout.x, GROUP=Hq // Hkv,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        PAGE_PER_TILE=page_size % config.block_n == 0 and not config.per_row_pages,
        LOGITS_IS_IDENTITY=tv.logits is identity,
        WINDOW_SKIP=window is not None, USE_TMA=use_tma,
        TMA_DIAG=config.tma_diag, KV_SCALES=k_scales is not None,
        **tv.kernel_args(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
