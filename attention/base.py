"""The attention backend contract.

FlashInfer-style split: `plan(batch)` runs once per step (host-side work, metadata,
split decisions); `forward(q, k, v, layer)` runs once per layer, stores the new K/V into
the pool and attends over cached prefix + new tokens. Everything the rest of the engine
may rely on is declared here: what a backend can do (`BackendCapabilities`), the graph key
its plan decides, its warm-up, and the per-layer hook that timing uses. Nothing outside a
backend reads its private attributes.

Backends are created by name through `attention.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from attention.batch import ForwardBatch
from attention.rotary import rotate
from attention.variants import Variant
from kvcache.pool import KVPool


@dataclass(frozen=True)
class AttentionConfig:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    variant: Variant = Variant()
    # the cache kind the backends for this config read (kvcache/cache_spec.py); the
    # registry picks among the backends of that kind
    cache_kind: ClassVar[str] = "kv"

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do, declared once per backend class (a hybrid derives its own).

    fused_rope_store: `forward_rope` rotates q and k, stores K/V and attends in its own
        kernels, so the model hands it q and k unrotated (see `forward_rope`).
    cuda_graphs: decode steps may be captured in CUDA graphs: `plan` only reads host lists
        and the batch's tensors, `forward` allocates nothing that outlives the step and
        never syncs; whatever `plan` decides on the host is returned by `graph_key`.
    """

    fused_rope_store: bool
    cuda_graphs: bool


@dataclass(frozen=True)
class RopeInputs:
    """What a fused rotary + store needs: absolute positions [T] and the model's cos|sin
    cache (float32 [max_positions, head_dim], cos in the first half, sin in the second)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor


class LayerHook(Protocol):
    """Brackets each layer's attention call (e.g. timing); `begin`/`end` get the layer."""

    def begin(self, layer: int) -> None: ...

    def end(self, layer: int) -> None: ...


class AttentionBackend(ABC):
    """q: [T, Hq, D]; k, v: [T, Hkv, D]; returns [T, Hq, D].

    A model layer calls `attend`; subclasses implement `forward` (and `forward_rope` when
    they declare `fused_rope_store`)."""

    name: ClassVar[str]
    supported_layouts: ClassVar[frozenset[str]]
    supported_variants: ClassVar[frozenset[str] | None] = None  # None: every variant
    # every concrete backend declares its own (tests/attention/test_backend_contract.py)
    capabilities: BackendCapabilities

    def __init__(self, config: AttentionConfig, pool: KVPool) -> None:
        if pool.layout.name not in self.supported_layouts:
            raise ValueError(
                f"attention backend {self.name!r} does not support KV layout "
                f"{pool.layout.name!r} (supported: {sorted(self.supported_layouts)})"
            )
        allowed = self.supported_variants
        if allowed is not None and config.variant.name not in allowed:
            raise ValueError(
                f"attention backend {self.name!r} does not support variant "
                f"{config.variant.name!r} (supported: {sorted(allowed)})"
            )
        self.config = config
        self.pool = pool
        self.batch: ForwardBatch | None = None
        self.graph_mode = False
        self._layer_hook: LayerHook | None = None

    @property
    def layer_kinds(self) -> list[str] | None:
        """Each model layer's attention kind, for a backend that serves a model mixing kinds
        (attention/backends/lightning.py); None: every layer is this backend's one kind."""
        return None

    # ------------------------------------------------------------------ once at start

    def warm_up(self) -> None:
        """Compile or initialise whatever a serving step will launch, so no request pays for
        it; called once at start, before any CUDA-graph capture. Default: nothing."""
        return None

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        """Context lengths whose graph-mode decode plans reach every `graph_key` the backend
        can return (each distinct key is its own graph); captured at start-up."""
        return [1, max_model_len]

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Before any capture: size every per-step scratch buffer for the worst graph-mode
        decode step of up to `max_batch` sequences (a graph keeps the addresses it was
        captured with). A backend without per-step scratch has nothing to do."""
        return None

    # ------------------------------------------------------------------ once per step

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        """Once per step, before the first layer. In `graph_mode` the step is (or replays) a
        captured decode graph: host decisions must come from the finite set that
        `cuda_graph_context_lengths` enumerates."""
        self.batch = batch
        self.graph_mode = graph_mode

    def graph_key(self) -> Hashable:
        """The host-side decision of the last `plan` that a captured graph bakes in (e.g. a
        KV split count); graphs are keyed by (batch size, graph_key)."""
        return ()

    # ------------------------------------------------------------------ once per layer

    @contextmanager
    def layer_hook(self, hook: LayerHook | None) -> Iterator[None]:
        """Within the block, every `attend` call is bracketed by `hook`."""
        previous, self._layer_hook = self._layer_hook, hook
        try:
            yield
        finally:
            self._layer_hook = previous

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               rope: RopeInputs | None = None) -> torch.Tensor:
        """What a model layer calls. With `rope`, q and k are unrotated and the backend
        rotates them (fused where it declares `fused_rope_store`); without, they are
        already rotated."""
        hook = self._layer_hook
        if hook is not None:
            hook.begin(layer)
        if rope is None:
            out = self.forward(q, k, v, layer)
        else:
            out = self.forward_rope(q, k, v, rope, layer)
        if hook is not None:
            hook.end(layer)
        return out

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Store k/v at the batch's slot_mapping, then attend (q and k already rotated)."""

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: RopeInputs, layer: int) -> torch.Tensor:
        """Rotate q and k (rotate-half convention, see attention/rotary.py), store the
        rotated k and v, attend. q, k, v may be strided views whose last dimension is
        contiguous. This default rotates in torch; fused backends override it."""
        return self.forward(rotate(q, rope.positions, rope.cos_sin_cache),
                            rotate(k, rope.positions, rope.cos_sin_cache), v, layer)
