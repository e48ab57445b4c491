"""The page pool: one K and one V tensor per layer, in the chosen KV layout, and for an FP8
cache with per-(token, head) scales one K and one V scale tensor per layer beside them
(kvcache/kv_dtype.py).

Page 0 is a scratch page that the allocator never hands out: padded batch entries (CUDA
graphs, dummy slots) write there, so no request's page is ever clobbered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvcache.allocator import SCRATCH_PAGE
from kvcache.cache_spec import pages_within_bytes
from kvcache.kv_dtype import KVCacheDtype, dequantize_rows, quantize_rows
from kvcache.layout import HND_ID, NHD_ID, KVLayout

__all__ = [  # SCRATCH_PAGE is the allocator's, re-exported for the pool's readers
    "SCRATCH_PAGE", "KVPool", "KVPoolConfig", "bytes_per_page", "pages_for_memory",
    "pages_for_tokens", "read_scales", "read_slots", "write_scales", "write_slots",
]

logger = logging.getLogger(__name__)


def _page_and_offset(layout: KVLayout, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()
    return slots // layout.page_size, slots % layout.page_size


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as their bytes: torch has no index/scatter kernels for float8 types."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def read_slots(cache: torch.Tensor, layout: KVLayout, slots: torch.Tensor) -> torch.Tensor:
    """Gather K (or V) at `slots` (any shape) -> [*slots.shape, kv_heads, head_dim]."""
    if cache.dtype == torch.float8_e4m3fn:
        return read_slots(_bits(cache), layout, slots).view(cache.dtype)
    if layout.kernel_id == NHD_ID:
        return cache.view(-1, layout.num_kv_heads, layout.head_dim)[slots.long()]
    page, off = _page_and_offset(layout, slots)
    if layout.kernel_id == HND_ID:
        return cache[page, :, off, :]
    x = layout.x
    return cache[page, :, off // x, :, off % x]


def write_slots(
    cache: torch.Tensor, layout: KVLayout, slots: torch.Tensor, values: torch.Tensor
) -> None:
    """Scatter `values` [T, kv_heads, head_dim] into `slots` [T]."""
    values = _bits(values.to(cache.dtype))
    cache = _bits(cache)
    if layout.kernel_id == NHD_ID:
        row = layout.num_kv_heads * layout.head_dim
        cache.view(-1, row).index_copy_(0, slots.long(), values.reshape(-1, row))
        return
    page, off = _page_and_offset(layout, slots)
    if layout.kernel_id == HND_ID:
        cache[page, :, off, :] = values
        return
    x = layout.x
    cache[page, :, off // x, :, off % x] = values


def read_scales(scales: torch.Tensor, layout: KVLayout, slots: torch.Tensor) -> torch.Tensor:
    """Gather the per-head scales [pages, kv_heads, page_size] at `slots` -> [*slots.shape,
    kv_heads]."""
    page, off = _page_and_offset(layout, slots)
    return scales[page, :, off]


def write_scales(scales: torch.Tensor, layout: KVLayout, slots: torch.Tensor,
                 values: torch.Tensor) -> None:
    """Scatter `values` [T, kv_heads] into the scales at `slots` [T]."""
    page, off = _page_and_offset(layout, slots)
    scales[page, :, off] = values.to(scales.dtype)


@dataclass
class KVPoolConfig:
    layout: KVLayout
    num_layers: int
    num_pages: int  # including the scratch page
    dtype: torch.dtype  # the model's: K/V arrive in it, and full-precision pages hold it
    device: torch.device
    kv_dtype: KVCacheDtype | None = None  # how rows are stored; None: as `dtype`

    @property
    def storage(self) -> KVCacheDtype:
        return self.kv_dtype if self.kv_dtype is not None else KVCacheDtype(self.dtype)


class KVPool:
    """Owns the KV tensors. Index math lives in `KVLayout`; page ownership in the allocator."""

    def __init__(self, config: KVPoolConfig) -> None:
        self.config = config
        self.layout = config.layout
        self.kv_dtype = config.storage
        if self.layout.element_bytes != self.kv_dtype.element_bytes:
            raise ValueError(f"layout {self.layout.describe()} has {self.layout.element_bytes}-"
                             f"byte elements, the KV cache dtype {self.kv_dtype.name} does not")
        shape = self.layout.cache_shape(config.num_pages)
        storage, layers, device = self.kv_dtype.dtype, range(config.num_layers), config.device
        self.k_caches = [torch.zeros(shape, dtype=storage, device=device) for _ in layers]
        self.v_caches = [torch.zeros(shape, dtype=storage, device=device) for _ in layers]
        # Per-(token, KV head) scales; 1.0 until a row is stored (codes there are 0).
        scale_shape = self.layout.scale_shape(config.num_pages)
        with_scales = self.kv_dtype.has_scales
        self.k_scales = [torch.ones(scale_shape, device=device) for _ in layers if with_scales]
        self.v_scales = [torch.ones(scale_shape, device=device) for _ in layers if with_scales]
        logger.info(
            "KV pool: %s, %s, %d pages (%d tokens), %d layers, %.1f MiB",
            self.layout.describe(),
            self.kv_dtype.describe(),
            config.num_pages,
            self.num_tokens,
            config.num_layers,
            self.nbytes / 2**20,
        )

    @property
    def num_pages(self) -> int:
        return self.config.num_pages

    @property
    def num_tokens(self) -> int:
        """Usable token capacity (the scratch page excluded)."""
        return (self.config.num_pages - 1) * self.layout.page_size

    @property
    def nbytes(self) -> int:
        tensors = self.k_caches + self.v_caches + self.k_scales + self.v_scales
        return sum(t.numel() * t.element_size() for t in tensors)

    def scales(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's K and V scales, (None, None) when the cache keeps none."""
        if not self.kv_dtype.has_scales:
            return None, None
        return self.k_scales[layer], self.v_scales[layer]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write k, v [T, kv_heads, head_dim] at `slots`, quantized when the cache is FP8."""
        k_scales, v_scales = self.scales(layer)
        for cache, scales, rows in ((self.k_caches[layer], k_scales, k),
                                    (self.v_caches[layer], v_scales, v)):
            if not self.kv_dtype.is_fp8:
                write_slots(cache, self.layout, slots, rows)
                continue
            assert self.kv_dtype.scale_mode is not None
            codes, row_scales = quantize_rows(rows, self.kv_dtype.scale_mode)
            write_slots(cache, self.layout, slots, codes)
            if scales is not None and row_scales is not None:
                write_scales(scales, self.layout, slots, row_scales)

    def gather(self, layer: int, slots: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape) -> two [*slots.shape, kv_heads, head_dim] in
        `dtype`, dequantized when the cache is FP8."""
        k_scales, v_scales = self.scales(layer)
        out = []
        for cache, scales in ((self.k_caches[layer], k_scales), (self.v_caches[layer], v_scales)):
            rows = read_slots(cache, self.layout, slots)
            if self.kv_dtype.is_fp8:
                row_scales = None if scales is None else read_scales(scales, self.layout, slots)
                out.append(dequantize_rows(rows, row_scales, dtype))
            else:
                out.append(rows.to(dtype))
        return out[0], out[1]


def bytes_per_page(layout: KVLayout, num_layers: int, kv_dtype: KVCacheDtype) -> int:
    """Bytes of one page over all layers: K and V rows, and their scales if any."""
    per_token = kv_dtype.bytes_per_token(layout.num_kv_heads, layout.head_dim)
    return num_layers * layout.page_size * per_token


def pages_for_tokens(layout: KVLayout, num_tokens: int) -> int:
    """Pages needed to hold `num_tokens`, plus the scratch page."""
    return -(-num_tokens // layout.page_size) + 1


def pages_for_memory(layout: KVLayout, num_layers: int, kv_dtype: KVCacheDtype,
                     memory_bytes: int) -> int:
    """Pages (the scratch page included) that fit in `memory_bytes`, at least 2."""
    return pages_within_bytes(bytes_per_page(layout, num_layers, kv_dtype), memory_bytes)
