"""Backends by name: lazy factories, so no backend module is imported until it is asked for
(and `attention.base` never imports a backend: no import cycle).

Adding a built-in backend is one line in `_BUILTIN`; a user's backend registers with
`register_backend(name, factory)`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from attention.base import AttentionBackend, AttentionConfig
from kvcache.pool import KVPool

BackendFactory = Callable[[AttentionConfig, KVPool], AttentionBackend]


@dataclass(frozen=True)
class _LazyBackend:
    target: str  # "module:attribute"
    requires: tuple[str, ...] = ()  # packages the module needs

    def available(self) -> bool:
        return all(importlib.util.find_spec(pkg) is not None for pkg in self.requires)

    def load(self) -> BackendFactory:
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


_BUILTIN: dict[str, _LazyBackend] = {
    "reference": _LazyBackend("attention.backends.reference:ReferenceBackend"),
    "paged": _LazyBackend("attention.backends.paged:PagedBackend"),
    "sdpa": _LazyBackend("attention.backends.sdpa:SDPABackend"),
    "flex": _LazyBackend("attention.backends.flex:FlexBackend"),
    "triton": _LazyBackend("attention.backends.triton_backend:TritonBackend", ("triton",)),
}
# Backends of the MLA latent cache (attention/mla/), chosen for an MLAConfig by the same names.
_BUILTIN_LATENT: dict[str, _LazyBackend] = {
    "reference": _LazyBackend("attention.mla.reference:MLAReferenceBackend"),
    "triton": _LazyBackend("attention.mla.triton_backend:MLATritonBackend", ("triton",)),
}
_BUILTIN_BY_KIND = {"kv": _BUILTIN, "latent": _BUILTIN_LATENT}
_USER: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory` creatable as `name` (e.g. `--attention-backend name`)."""
    _USER[name] = factory


def backend_names(cache_kind: str = "kv") -> list[str]:
    """Every backend that can be created here for a cache kind (built-ins whose packages are
    installed; user backends serve the K/V cache)."""
    builtin = _BUILTIN_BY_KIND[cache_kind]
    user = set(_USER) if cache_kind == "kv" else set()
    return sorted({n for n, b in builtin.items() if b.available()} | user)


def backend_factory(name: str, cache_kind: str = "kv") -> BackendFactory:
    if cache_kind == "kv" and name in _USER:
        return _USER[name]
    lazy = _BUILTIN_BY_KIND[cache_kind].get(name)
    if lazy is None or not lazy.available():
        what = "attention backend" if cache_kind == "kv" else f"attention backend for a {cache_kind} cache"
        raise ValueError(f"unknown {what} {name!r}; choose one of {backend_names(cache_kind)}")
    return lazy.load()


def create_backend(name: str, config: AttentionConfig, pool: KVPool) -> AttentionBackend:
    return backend_factory(name, config.cache_kind)(config, pool)


# The layouts the paged backend reads in place (its `supported_layouts`; a test keeps the two
# equal without importing the backend here).
PAGED_LAYOUTS = frozenset({"token", "nhd"})


def default_backend(device_type: str, kv_layout: str, cache_kind: str = "kv",
                    fp8: bool = False) -> str:
    """What `--attention-backend auto` means: triton on a GPU; on a CPU the paged backend,
    which reads long cached contexts in place, where it serves the cache (full-precision K/V
    rows in a key-major layout), else reference."""
    if device_type == "cuda":
        return "triton"
    paged = cache_kind == "kv" and not fp8 and kv_layout in PAGED_LAYOUTS
    return "paged" if paged else "reference"


def build_attention_backend(
    config: AttentionConfig,
    pool: KVPool,
    backend: str,
    prefill_backend: str | None = None,
    decode_backend: str | None = None,
) -> AttentionBackend:
    """`--attention-backend`, optionally overridden per phase by `--prefill-backend` /
    `--decode-backend` (then a `HybridBackend` of the two)."""
    pre = prefill_backend or backend
    dec = decode_backend or backend
    if pre == dec:
        return create_backend(pre, config, pool)
    from attention.backends.hybrid import HybridBackend

    return HybridBackend(create_backend(pre, config, pool), create_backend(dec, config, pool))
