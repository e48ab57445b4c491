"""Attention: the backend contract, batch metadata, backends, Triton kernels."""

from attention.base import (
    AttentionBackend,
    AttentionConfig,
    BackendCapabilities,
    LayerHook,
    RopeInputs,
)
from attention.batch import ForwardBatch
from attention.registry import (
    backend_names,
    build_attention_backend,
    create_backend,
    register_backend,
)
from attention.variants import Variant, parse_variant

__all__ = [
    "AttentionBackend",
    "AttentionConfig",
    "BackendCapabilities",
    "ForwardBatch",
    "LayerHook",
    "RopeInputs",
    "Variant",
    "backend_names",
    "build_attention_backend",
    "create_backend",
    "parse_variant",
    "register_backend",
]
