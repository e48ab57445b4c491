"""The page pool: one K and one V tensor per layer, in the chosen KV layout.

Page 0 is a scratch page that the allocator never hands out: padded batch entries (CUDA
graphs, dummy slots) write there, so no request's page is ever clobbered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvcache.allocator import SCRATCH_PAGE
from kvcache.layout import HND_ID, NHD_ID, KVLayout

__all__ = [  # SCRATCH_PAGE is the allocator's, re-exported for the pool's readers
    "SCRATCH_PAGE", "KVPool", "KVPoolConfig", "bytes_per_page", "pages_for_memory_fraction",
    "pages_for_tokens", "read_slots", "write_slots",
]

logger = logging.getLogger(__name__)


def _page_and_offset(layout: KVLayout, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long()
    return slots // layout.page_size, slots % layout.page_size


def read_slots(cache: torch.Tensor, layout: KVLayout, slots: torch.Tensor) -> torch.Tensor:
    """Gather K (or V) at `slots` (any shape) -> [*slots.shape, kv_heads, head_dim]."""
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
    values = values.to(cache.dtype)
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


@dataclass
class KVPoolConfig:
    layout: KVLayout
    num_layers: int
    num_pages: int  # including the scratch page
    dtype: torch.dtype
    device: torch.device


class KVPool:
    """Owns the KV tensors. Index math lives in `KVLayout`; page ownership in the allocator."""

    def __init__(self, config: KVPoolConfig) -> None:
        self.config = config
        self.layout = config.layout
        shape = self.layout.cache_shape(config.num_pages)
        self.k_caches = [
            torch.zeros(shape, dtype=config.dtype, device=config.device)
            for _ in range(config.num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=config.dtype, device=config.device)
            for _ in range(config.num_layers)
        ]
        logger.info(
            "KV pool: %s, %d pages (%d tokens), %d layers, %.1f MiB",
            self.layout.describe(),
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
        return sum(t.numel() * t.element_size() for t in self.k_caches + self.v_caches)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        write_slots(self.k_caches[layer], self.layout, slots, k)
        write_slots(self.v_caches[layer], self.layout, slots, v)


def bytes_per_page(layout: KVLayout, num_layers: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * layout.page_size * layout.num_kv_heads * layout.head_dim * elem


def pages_for_tokens(layout: KVLayout, num_tokens: int) -> int:
    """Pages needed to hold `num_tokens`, plus the scratch page."""
    return -(-num_tokens // layout.page_size) + 1


def pages_for_memory_fraction(
    layout: KVLayout, num_layers: int, dtype: torch.dtype, device: torch.device, fraction: float
) -> int:
    """Pages that fit in `fraction` of the GPU's total memory, after what is already used."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(total * fraction) - used
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {fraction} leaves no room for the KV cache "
            f"({used / 2**30:.1f} GiB already in use of {total / 2**30:.1f} GiB)"
        )
    return max(2, budget // bytes_per_page(layout, num_layers, dtype))
