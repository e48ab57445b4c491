"""KV-cache layouts: the shape of one layer's K (or V) tensor and its index math.

A *slot* is `page * page_size + offset`. Every layout maps (page, offset, head, dim) to an
element of one contiguous tensor. `KVLayout` is the one description every kernel reads: its
`kernel_id` (the kernels' compile-time `LAYOUT` parameter), `strides()`, `page_size` and `x`.
Pure Python: no torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Kernel ids: which index math a kernel compiles for (its `LAYOUT` constexpr).
NHD_ID = 0  # [.., page_size, kv_heads, head_dim]: token and nhd
HND_ID = 1  # [.., kv_heads, page_size, head_dim]
HNDX_ID = 2  # [.., kv_heads, page_size / x, head_dim, x]


@dataclass(frozen=True)
class LayoutKind:
    """What a layout name stands for, whatever the sizes."""

    name: str
    dims: str
    kernel_id: int
    page_size: int | None = None  # fixed by the layout (token: 1), else chosen by the user


_KINDS = (
    # token is nhd with page size 1: the block table is the request-to-token table
    LayoutKind("token", "[slots, kv_heads, head_dim]", NHD_ID, page_size=1),
    LayoutKind("nhd", "[pages, page_size, kv_heads, head_dim]", NHD_ID),
    LayoutKind("hnd", "[pages, kv_heads, page_size, head_dim]", HND_ID),
    LayoutKind("hnd_x", "[pages, kv_heads, page_size/x, head_dim, x]", HNDX_ID),
)
LAYOUT_KINDS = {kind.name: kind for kind in _KINDS}
LAYOUT_NAMES = tuple(LAYOUT_KINDS)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1}


def _kind(name: str) -> LayoutKind:
    if name not in LAYOUT_KINDS:
        raise ValueError(f"unknown KV layout {name!r}; choose one of {LAYOUT_NAMES}")
    return LAYOUT_KINDS[name]


def page_size_for(name: str, requested: int) -> int:
    """The page size a layout gets when `requested` is asked for (token's is always 1)."""
    fixed = _kind(name).page_size
    return requested if fixed is None else fixed


@dataclass(frozen=True)
class KVLayout:
    """A named layout with its sizes.

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
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.page_size != page_size_for(self.name, self.page_size):  # token: 1
            raise ValueError(f"the {self.name!r} layout has page size {self.kind.page_size}")
        if self.kernel_id == HNDX_ID and self.page_size % self.x != 0:
            raise ValueError(
                f"hnd_x needs a page size that is a multiple of x={self.x} "
                f"(16 bytes / {self.element_bytes}-byte elements)"
            )

    @classmethod
    def create(
        cls, name: str, page_size: int, num_kv_heads: int, head_dim: int, dtype_name: str
    ) -> KVLayout:
        """Build a layout; `dtype_name` is e.g. 'bfloat16' (str(torch.dtype) also works).
        A layout with a fixed page size (token) takes it whatever `page_size` says."""
        key = dtype_name.removeprefix("torch.")
        if key not in _DTYPE_BYTES:
            raise ValueError(f"unsupported KV dtype {dtype_name!r}")
        page_size = page_size_for(name, page_size)
        return cls(name, page_size, num_kv_heads, head_dim, _DTYPE_BYTES[key])

    @property
    def kind(self) -> LayoutKind:
        return _kind(self.name)

    @property
    def kernel_id(self) -> int:
        """The kernels' `LAYOUT` constexpr: NHD_ID, HND_ID or HNDX_ID."""
        return self.kind.kernel_id

    @property
    def x(self) -> int:
        """Elements per 16-byte vector (the innermost dimension of hnd_x)."""
        return max(1, 16 // self.element_bytes)

    def cache_shape(self, num_pages: int) -> tuple[int, ...]:
        P, H, D = self.page_size, self.num_kv_heads, self.head_dim
        if self.name == "token":
            return (num_pages, H, D)
        if self.kernel_id == NHD_ID:
            return (num_pages, P, H, D)
        if self.kernel_id == HND_ID:
            return (num_pages, H, P, D)
        return (num_pages, H, P // self.x, D, self.x)

    def scale_shape(self, num_pages: int) -> tuple[int, int, int]:
        """One layer's per-(token, KV head) scales of an FP8 cache: [pages, kv_heads,
        page_size] in every layout, so a head's scales of a page are contiguous."""
        return (num_pages, self.num_kv_heads, self.page_size)

    def scale_strides(self) -> tuple[int, int]:
        """(page, head) element strides of the scales (the offset in the page has stride 1):
        the scale of slot s, head h is at (s // P) * s_page + h * s_head + s % P."""
        return (self.num_kv_heads * self.page_size, self.page_size)

    def element_offset(self, page: int, offset: int, head: int, dim: int) -> int:
        """Flat element index of (page, offset-in-page, kv head, dim) in one layer's tensor."""
        s_page, s_off, s_head, s_dim, s_xblk = self.strides()
        if self.kernel_id == HNDX_ID:
            return (page * s_page + (offset // self.x) * s_xblk + (offset % self.x) * s_off
                    + head * s_head + dim * s_dim)
        return page * s_page + offset * s_off + head * s_head + dim * s_dim

    def strides(self) -> tuple[int, int, int, int, int]:
        """(page, offset, head, dim, x-block) element strides for kernels.

        For every layout but hnd_x the element offset is
        page*s_page + offset*s_off + head*s_head + dim*s_dim. For hnd_x it is
        page*s_page + (offset // x)*s_xblk + (offset % x)*s_off + head*s_head + dim*s_dim.
        """
        P, H, D = self.page_size, self.num_kv_heads, self.head_dim
        if self.kernel_id == NHD_ID:
            return (P * H * D, H * D, D, 1, 0)
        if self.kernel_id == HND_ID:
            return (H * P * D, D, P * D, 1, 0)
        x = self.x
        return (H * P * D, 1, P * D, x, D * x)

    def key_rows_view(self) -> tuple[int, ...]:
        """The trailing dims of the view `cache.view(-1, *dims)` whose rows are one key of
        one head (hnd_x: one run of x keys), through which bulk copies (TMA) read key tiles:
        nhd (kv_heads * head_dim,) with the head as a column offset, hnd (head_dim,),
        hnd_x (head_dim, x)."""
        if self.kernel_id == NHD_ID:
            return (self.num_kv_heads * self.head_dim,)
        if self.kernel_id == HND_ID:
            return (self.head_dim,)
        return (self.head_dim, self.x)

    def describe(self) -> str:
        return f"{self.name} {self.kind.dims} page_size={self.page_size}"
