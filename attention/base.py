"""The attention backend interface and its registry.

FlashInfer-style split: `plan(batch)` runs once per step (host-side work, metadata,
split decisions); `forward(q, k, v, layer)` runs once per layer, stores the new K/V into
the pool and attends over cached prefix + new tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from attention.batch import ForwardBatch
from attention.variants import Variant
from kvcache.pool import KVPool


@dataclass(frozen=True)
class AttentionConfig:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    variant: Variant = Variant()

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


class AttentionBackend(ABC):
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (rotary already applied); returns [T, Hq, D]."""

    name: ClassVar[str]
    supported_layouts: ClassVar[frozenset[str]]
    supported_variants: ClassVar[frozenset[str] | None] = None  # None: every variant
    # Whether decode steps may be captured in CUDA graphs (model/cuda_graphs.py): `plan` then
    # only reads host lists and the batch's tensors, and `forward` allocates nothing that
    # outlives the step and never syncs.
    supports_cuda_graphs: ClassVar[bool] = False

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

    def plan(self, batch: ForwardBatch) -> None:
        """Once per step, before the first layer."""
        self.batch = batch

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        """Context lengths whose decode plans reach every host-side decision `plan` can make
        (each distinct decision is its own graph); captured at start-up."""
        return [1, max_model_len]

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Before any capture: size every per-step scratch buffer for the worst decode step
        of up to `max_batch` sequences (a graph keeps the addresses it was captured with).
        A backend without per-step scratch has nothing to do."""
        return None

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Once per layer: store k/v at the batch's slot_mapping, then attend."""


BackendFactory = Callable[[AttentionConfig, KVPool], AttentionBackend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    def wrap(factory: BackendFactory) -> BackendFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_builtin_backends() -> None:
    # Imported lazily: backends may need optional packages (triton).
    import attention.backends  # noqa: F401


def backend_names() -> list[str]:
    _load_builtin_backends()
    return sorted(_REGISTRY)


def create_backend(name: str, config: AttentionConfig, pool: KVPool) -> AttentionBackend:
    _load_builtin_backends()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    return _REGISTRY[name](config, pool)
