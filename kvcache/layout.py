"""KV-cache layouts: the shape of one layer's K (or V) tensor and its index math.

A *slot* is `page * page_size + offset`. Every layout maps (page, offset, head, dim) to
an element of one contiguous tensor; kernels take the layout name as a compile-time
parameter and use `element_offset`'s formula. Pure Python: no torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_NAMES = ("token", "nhd", "hnd", "hnd_x")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class KVLayout:
    """A named KV layout.

    - token: [slots, kv_heads, head_dim], page size 1
    - nhd:   [pages, page_size, kv_heads, head_dim]
    - hnd:   [pages, kv_heads, page_size, head_dim]
    - hnd_x: [pages, kv_heads, page_size / x, head_dim, x], x = 16 bytes / element size
    """

    name: str
    page_size: int
    num_kv_heads: int
    head_dim: int
    element_bytes: int = 2

    def __post_init__(self) -> None:
        if self.name not in LAYOUT_NAMES:
            raise ValueError(f"unknown KV layout {self.name!r}; choose one of {LAYOUT_NAMES}")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.name == "token" and self.page_size != 1:
            raise ValueError("the 'token' layout has page size 1")
        if self.name == "hnd_x" and self.page_size % self.x != 0:
            raise ValueError(
                f"hnd_x needs a page size that is a multiple of x={self.x} "
                f"(16 bytes / {self.element_bytes}-byte elements)"
            )

    @classmethod
    def create(
        cls, name: str, page_size: int, num_kv_heads: int, head_dim: int, dtype_name: str
    ) -> KVLayout:
        """Build a layout; `dtype_name` is e.g. 'bfloat16' (str(torch.dtype) also works)."""
        key = dtype_name.removeprefix("torch.")
        if key not in _DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {dtype_name!r}")
        if name == "token":
            page_size = 1
        return cls(name, page_size, num_kv_heads, head_dim, _DTYPE_BYTES[key])

    @property
    def x(self) -> int:
        """Elements per 16-byte vector (the innermost dimension of hnd_x)."""
        return max(1, 16 // self.element_bytes)

    def cache_shape(self, num_pages: int) -> tuple[int, ...]:
        P, H, D = self.page_size, self.num_kv_heads, self.head_dim
        if self.name == "token":
            return (num_pages, H, D)
        if self.name == "nhd":
            return (num_pages, P, H, D)
        if self.name == "hnd":
            return (num_pages, H, P, D)
        return (num_pages, H, P // self.x, D, self.x)

    def element_offset(self, page: int, offset: int, head: int, dim: int) -> int:
        """Flat element index of (page, offset-in-page, kv head, dim) in one layer's tensor."""
        P, H, D = self.page_size, self.num_kv_heads, self.head_dim
        if self.name in ("token", "nhd"):
            return ((page * P + offset) * H + head) * D + dim
        if self.name == "hnd":
            return ((page * H + head) * P + offset) * D + dim
        x = self.x
        return (((page * H + head) * (P // x) + offset // x) * D + dim) * x + offset % x

    def strides(self) -> tuple[int, int, int, int, int]:
        """(page, offset, head, dim, x-block) element strides for kernels.

        For every layout but hnd_x the element offset is
        page*s_page + offset*s_off + head*s_head + dim*s_dim. For hnd_x it is
        page*s_page + (offset // x)*s_xblk + (offset % x)*s_off + head*s_head + dim*s_dim.
        """
        P, H, D = self.page_size, self.num_kv_heads, self.head_dim
        if self.name in ("token", "nhd"):
            return (P * H * D, H * D, D, 1, 0)
        if self.name == "hnd":
            return (H * P * D, D, P * D, 1, 0)
        x = self.x
        return (H * P * D, 1, P * D, x, D * x)

    def describe(self) -> str:
        dims = {
            "token": "[slots, kv_heads, head_dim]",
            "nhd": "[pages, page_size, kv_heads, head_dim]",
            "hnd": "[pages, kv_heads, page_size, head_dim]",
            "hnd_x": "[pages, kv_heads, page_size/x, head_dim, x]",
        }[self.name]
        return f"{self.name} {dims} page_size={self.page_size}"
