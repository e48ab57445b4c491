"""What one layer keeps per token in the paged cache (DESIGN.md, "Attention kinds and their
caches"): each model layer declares a `CacheSpec`, and the engine sizes and builds its pool
from the specs, so no caller asks which attention kind a model has.

Every paged kind shares the request's page ids (one block table for the model), so the
allocator, the radix tree and preemption do not change with the kind. Pure Python at import
time; the pools (torch) are imported when one is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvcache.layout import KVLayout

if TYPE_CHECKING:
    import torch

    from kvcache.kv_dtype import KVCacheDtype
    from kvcache.latent_pool import LatentLayout, LatentPool
    from kvcache.pool import KVPool

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def dtype_bytes(dtype_name: str) -> int:
    key = dtype_name.removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unsupported KV dtype {dtype_name!r}")
    return _DTYPE_BYTES[key]


class CacheSpec(Protocol):
    """A layer's per-token cache: its kind, how its layout is made, what it costs."""

    kind: str

    def values_per_token(self) -> int:
        """Cache elements one token takes in one layer."""
        ...

    def stored_bytes_per_token(self, kv_dtype: KVCacheDtype) -> int:
        """Bytes one token takes in one layer as stored in `kv_dtype` (scales included)."""
        ...

    def make_layout(self, layout_name: str, page_size: int, dtype_name: str) -> object: ...

    def build_pool(self, layout: object, num_layers: int, num_pages: int,
                   dtype: torch.dtype, device: torch.device,
                   kv_dtype: KVCacheDtype | None = None) -> object:
        """`kv_dtype` None: rows stored in `dtype`."""
        ...


@dataclass(frozen=True)
class KVHeadsSpec:
    """Softmax GQA/MHA: K and V rows of `num_kv_heads x head_dim`, in a `KVLayout`."""

    num_kv_heads: int
    head_dim: int
    kind: str = "kv"

    def values_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def stored_bytes_per_token(self, kv_dtype: KVCacheDtype) -> int:
        return kv_dtype.bytes_per_token(self.num_kv_heads, self.head_dim)

    def make_layout(self, layout_name: str, page_size: int, dtype_name: str) -> KVLayout:
        return KVLayout.create(layout_name, page_size, self.num_kv_heads, self.head_dim,
                               dtype_name)

    def build_pool(self, layout: KVLayout, num_layers: int, num_pages: int,
                   dtype: torch.dtype, device: torch.device,
                   kv_dtype: KVCacheDtype | None = None) -> KVPool:
        from kvcache.pool import KVPool, KVPoolConfig

        return KVPool(KVPoolConfig(layout, num_layers, num_pages, dtype, device, kv_dtype))


@dataclass(frozen=True)
class LatentSpec:
    """MLA: one row per token, the compressed KV latent (`kv_lora_rank`, RMS-normed) and the
    decoupled rotary key (`rope_dim`, rotated), shared by every head of the layer."""

    kv_lora_rank: int
    rope_dim: int
    kind: str = "latent"

    @property
    def row_width(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    def values_per_token(self) -> int:
        return self.row_width

    def stored_bytes_per_token(self, kv_dtype: KVCacheDtype) -> int:
        _refuse_fp8_latent(kv_dtype.storage_name)
        return self.row_width * kv_dtype.element_bytes

    def make_layout(self, layout_name: str, page_size: int, dtype_name: str) -> LatentLayout:
        from kvcache.latent_pool import LatentLayout

        _refuse_fp8_latent(dtype_name)
        return LatentLayout.create(layout_name, page_size, self.kv_lora_rank, self.rope_dim,
                                   dtype_name)

    def build_pool(self, layout: LatentLayout, num_layers: int, num_pages: int,
                   dtype: torch.dtype, device: torch.device,
                   kv_dtype: KVCacheDtype | None = None) -> LatentPool:
        from kvcache.latent_pool import LatentPool

        if kv_dtype is not None:
            _refuse_fp8_latent(kv_dtype.storage_name)
        return LatentPool(layout, num_layers, num_pages, dtype, device)


def _refuse_fp8_latent(dtype_name: str) -> None:
    if "float8" in dtype_name:
        raise ValueError("--kv-cache-dtype fp8 is not supported for an MLA latent cache yet; "
                         "use --kv-cache-dtype auto")


@dataclass(frozen=True)
class LinearStateSpec:
    """Linear (lightning) attention: nothing per token; each request carries one float32
    state per head, `head_dim x head_dim` (the decayed sum of k^T v), in a state slot
    (kvcache/state_pool.py) instead of pages."""

    num_heads: int
    head_dim: int
    kind: str = "linear_state"

    def values_per_token(self) -> int:
        return 0

    def stored_bytes_per_token(self, kv_dtype: KVCacheDtype) -> int:
        return 0

    def state_bytes(self) -> int:
        """Bytes one request's state takes in one layer (float32)."""
        return self.num_heads * self.head_dim * self.head_dim * 4


@dataclass(frozen=True)
class LayerCaches:
    """How a model's layers split between the paged cache and the state slots: the paged
    spec and the layers that use it (a layer's index in the pool is its position in
    `paged_layers`), and the linear-state spec and its layers (likewise in the state pool)."""

    paged: CacheSpec
    paged_layers: list[int]
    state: LinearStateSpec | None
    state_layers: list[int]

    @property
    def is_hybrid(self) -> bool:
        return self.state is not None


def split_layer_specs(layer_specs: list[CacheSpec]) -> LayerCaches:
    """Group the layers by cache: one paged kind for every paged layer (`uniform_spec`) and
    at most one linear-state spec."""
    paged_layers = [i for i, s in enumerate(layer_specs) if not isinstance(s, LinearStateSpec)]
    state_layers = [i for i, s in enumerate(layer_specs) if isinstance(s, LinearStateSpec)]
    if not paged_layers:
        raise ValueError("a model with linear attention only (no softmax layer) is not "
                         "supported: the engine needs one paged cache")
    paged = uniform_spec([layer_specs[i] for i in paged_layers])
    state = None
    if state_layers:
        state = layer_specs[state_layers[0]]
        assert isinstance(state, LinearStateSpec)
        if any(layer_specs[i] != state for i in state_layers):
            raise ValueError("linear-attention layers with different state shapes are not "
                             "supported")
    return LayerCaches(paged, paged_layers, state, state_layers)


def uniform_spec(layer_specs: list[CacheSpec]) -> CacheSpec:
    """The one spec every layer shares. A model that mixes kinds layer by layer needs a pool
    per kind, which nothing builds yet: refused here rather than half-served."""
    if not layer_specs:
        raise ValueError("a model needs at least one layer")
    first = layer_specs[0]
    if any(spec != first for spec in layer_specs[1:]):
        kinds = sorted({spec.kind for spec in layer_specs})
        raise ValueError(f"layers with different cache specs ({kinds}) are not supported yet")
    return first


def bytes_per_token(spec: CacheSpec, num_layers: int, dtype_name: str) -> int:
    """Cache bytes one token takes over all layers (MLA, bf16: 1,152 per layer)."""
    return spec.values_per_token() * dtype_bytes(dtype_name) * num_layers


def pages_within_bytes(page_bytes: int, memory_bytes: int) -> int:
    """Pages of `page_bytes` (all layers) in `memory_bytes`, the scratch page included."""
    if memory_bytes <= 0:
        raise ValueError(f"the KV cache needs some memory, got {memory_bytes} bytes")
    return max(2, memory_bytes // page_bytes)


def pages_within_memory(page_bytes: int, device: torch.device, fraction: float) -> int:
    """Pages of `page_bytes` (all layers) that fit in `fraction` of the GPU's total memory,
    after what is already used."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(total * fraction) - used
    if budget <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {fraction} leaves no room for the KV cache "
            f"({used / 2**30:.1f} GiB already in use of {total / 2**30:.1f} GiB)")
    return max(2, budget // page_bytes)
