"""Attention: backend interface, batch metadata, backends, Triton kernels (benchmarks: bench/)."""

from attention.base import (
    AttentionBackend,
    AttentionConfig,
    backend_names,
    create_backend,
    register_backend,
)
from attention.batch import ForwardBatch
from attention.variants import Variant, parse_variant

__all__ = [
    "AttentionBackend",
    "AttentionConfig",
    "ForwardBatch",
    "Variant",
    "backend_names",
    "create_backend",
    "parse_variant",
    "register_backend",
]
