"""Notice the Triton kernel instances built after start-up.

A serving step that meets a kernel specialisation nobody warmed up stalls on the compiler
(docs/architecture.md, start-up warm-up). `KernelInstanceWatch` counts the compiled
instances each of our kernels holds (Triton keeps one per specialisation in the kernel's
per-device cache) and reports the growth since it last looked; the engine looks after every
step and logs and counts any growth (attnserve_kernel_compiles_total).

The caches belong to the process, not to one engine: a second engine or a benchmark in the
same process that builds kernels shows up in the first engine's count too (the server runs
one engine per process).

Counting the caches rather than using Triton's compile hooks is deliberate: with a hook
installed, Triton 3.6 serialises each kernel's constexpr arguments to JSON and fails on the
jitted variant functions this project passes as constexprs. Under TRITON_INTERPRET=1 kernels
are interpreted, never compiled, and every count stays 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

# The modules whose jitted functions are launched as kernels.
KERNEL_MODULES = (
    "attention.triton.decode",
    "attention.triton.decode_hndx",
    "attention.triton.extend",
    "attention.triton.extend_sm90",
    "attention.triton.rope_store",
    "attention.triton.fp8_prefill",
    "attention.linear.extend",
    "attention.linear.decode",
    "model.skinny_gemm",  # --decode-gemm triton
)


def _jitted_functions(module_names: Iterable[str]) -> dict[str, Any]:
    """Name -> jitted function, for every Triton function defined in the modules (helpers
    that are only inlined into kernels keep empty caches and count 0)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional kernel module (the extend kernel) may be absent
            continue
        for attr, value in vars(module).items():
            # a function imported from another listed module is counted once
            if isinstance(value, JITFunction) and id(value) not in seen:
                seen.add(id(value))
                found[f"{name.rsplit('.', 1)[-1]}.{attr}"] = value
    return found


def _instances(fn: Any) -> int:
    """Compiled instances of one jitted function, over all devices."""
    caches = getattr(fn, "device_caches", None)
    if not caches:
        return 0
    total = 0
    for entry in list(caches.values()):
        kernel_cache = entry[0] if isinstance(entry, tuple) else entry
        total += len(kernel_cache)
    return total


class KernelInstanceWatch:
    """Compiled-instance counts of the project's kernels, and their growth between looks."""

    def __init__(self, module_names: Iterable[str] = KERNEL_MODULES) -> None:
        self.kernels = _jitted_functions(module_names)
        self.last = self.counts()

    def counts(self) -> dict[str, int]:
        return {name: _instances(fn) for name, fn in self.kernels.items()}

    def total(self) -> int:
        return sum(self.last.values())

    def new_instances(self) -> dict[str, int]:
        """Kernel name -> instances built since the previous call (only those that grew)."""
        now = self.counts()
        grown = {name: n - self.last.get(name, 0) for name, n in now.items()
                 if n > self.last.get(name, 0)}
        self.last = now
        return grown
