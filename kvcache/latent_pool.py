"""The MLA latent cache: one [pages, page_size, kv_lora_rank + rope_dim] tensor per layer.

A token's row is its compressed KV latent (columns [0, kv_lora_rank)) followed by its rotated
rotary key (the last rope_dim columns); every head of the layer reads the same row (the key
is the whole row, the value its first kv_lora_rank columns). Slots are
`page * page_size + offset`, as for the K/V pool, and page 0 is the scratch page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvcache.cache_spec import dtype_bytes

logger = logging.getLogger(__name__)

# --kv-layout names a latent cache accepts: one row per token leaves nothing to transpose,
# so nhd (and token, its page size 1) is the only arrangement.
LATENT_LAYOUT_NAMES = ("nhd", "token")


@dataclass(frozen=True)
class LatentLayout:
    page_size: int
    kv_lora_rank: int
    rope_dim: int
    element_bytes: int = 2
    name: str = "latent"

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")

    @classmethod
    def create(cls, layout_name: str, page_size: int, kv_lora_rank: int, rope_dim: int,
               dtype_name: str) -> LatentLayout:
        """The latent layout for a `--kv-layout` value (token: pages of one token)."""
        if layout_name not in LATENT_LAYOUT_NAMES:
            raise ValueError(
                f"KV layout {layout_name!r} does not apply to an MLA latent cache "
                f"(one row per token); use one of {LATENT_LAYOUT_NAMES}")
        page_size = 1 if layout_name == "token" else page_size
        return cls(page_size, kv_lora_rank, rope_dim, dtype_bytes(dtype_name))

    @property
    def row_width(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def cache_shape(self, num_pages: int) -> tuple[int, int, int]:
        return (num_pages, self.page_size, self.row_width)

    def bytes_per_page(self, num_layers: int) -> int:
        return num_layers * self.page_size * self.row_width * self.element_bytes

    def describe(self) -> str:
        return (f"latent [pages, page_size, {self.kv_lora_rank}+{self.rope_dim}] "
                f"page_size={self.page_size}")


class LatentPool:
    """Owns the latent tensors; page ownership stays with the allocator."""

    def __init__(self, layout: LatentLayout, num_layers: int, num_pages: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if num_pages < 2:
            raise ValueError("the latent pool needs the scratch page and at least one more")
        self.layout = layout
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device
        self._num_pages = num_pages
        shape = layout.cache_shape(num_pages)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        logger.info("latent KV pool: %s, %d pages (%d tokens), %d layers, %.1f MiB",
                    layout.describe(), num_pages, self.num_tokens, num_layers,
                    self.nbytes / 2**20)

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_tokens(self) -> int:
        """Usable token capacity (the scratch page excluded)."""
        return (self._num_pages - 1) * self.layout.page_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.caches)

    def rows(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s cache viewed as [slots, row_width]."""
        return self.caches[layer].view(-1, self.layout.row_width)

    def store(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Write `rows` [T, row_width] (latent | rotated rope key) at `slots` [T]."""
        self.rows(layer).index_copy_(0, slots.long(), rows.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows at `slots` (any shape) -> [*slots.shape, row_width]."""
        return self.rows(layer)[slots.long()]
