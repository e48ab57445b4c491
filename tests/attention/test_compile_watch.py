"""attention/triton/compile_watch.py: the watch finds the project's jitted functions and
reports how many compiled instances each gained since it last looked. Nothing compiles on
CPU (the interpreter runs kernels without building them), so the tests give real
JITFunction objects per-device caches of the shape Triton keeps: device -> (kernel cache,
...)."""

from __future__ import annotations

import os
import sys
import types

import pytest

from attention.triton.compile_watch import KERNEL_MODULES, KernelInstanceWatch

jit = pytest.importorskip("triton.runtime.jit")


def _kernel_a(x):  # bodies never run: only the JITFunction wrappers are inspected
    return x


def _kernel_b(x):
    return x


def fake_kernel_module(monkeypatch: pytest.MonkeyPatch) -> tuple[str, object, object]:
    """A module holding two JITFunctions (as a kernel module under a real GPU would)."""
    module = types.ModuleType("fake_kernels")
    a, b = jit.JITFunction(_kernel_a), jit.JITFunction(_kernel_b)
    module.kernel_a, module.kernel_b, module.not_a_kernel = a, b, 42
    for fn in (a, b):
        fn.device_caches = {}
    monkeypatch.setitem(sys.modules, "fake_kernels", module)
    return "fake_kernels", a, b


def build(fn: object, device: int = 0) -> None:
    """What Triton does when it compiles a new specialisation on `device`."""
    caches = fn.device_caches  # type: ignore[attr-defined]
    entry = caches.setdefault(device, ({}, None))
    entry[0][f"specialisation-{len(entry[0])}"] = object()


def test_growth_is_reported_once_per_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    name, a, b = fake_kernel_module(monkeypatch)
    build(a)
    watch = KernelInstanceWatch([name])
    assert set(watch.kernels) == {"fake_kernels.kernel_a", "fake_kernels.kernel_b"}
    assert watch.total() == 1 and watch.new_instances() == {}
    build(a)
    build(b)
    build(b, device=1)  # another GPU's cache counts too
    assert watch.new_instances() == {"fake_kernels.kernel_a": 1, "fake_kernels.kernel_b": 2}
    assert watch.new_instances() == {}  # reported once
    assert watch.total() == 4


def test_the_project_kernel_modules_are_found() -> None:
    watch = KernelInstanceWatch(KERNEL_MODULES)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # interpreted kernels are not JITFunctions and are never built: nothing to count
        # (the Gluon kernels stay JITFunctions but have no CPU path and never run here)
        assert all(name.startswith(("extend_sm90.", "decode_hndx.")) for name in watch.kernels)
        assert watch.total() == 0
    else:
        assert {"decode._decode_kernel", "decode._merge_kernel", "extend._extend_kernel",
                "rope_store._rope_store_kernel", "extend_sm90._extend_sm90_kernel",
                "decode_hndx._hndx_decode_kernel"} <= set(watch.kernels)
    assert watch.new_instances() == {}


def test_a_function_imported_into_several_modules_is_counted_once(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    name, a, _ = fake_kernel_module(monkeypatch)
    other = types.ModuleType("fake_kernels_importer")
    other.kernel_a = a  # `from fake_kernels import kernel_a`
    monkeypatch.setitem(sys.modules, "fake_kernels_importer", other)
    watch = KernelInstanceWatch([name, "fake_kernels_importer"])
    build(a)
    assert watch.new_instances() == {"fake_kernels.kernel_a": 1}


def test_a_missing_module_is_skipped() -> None:
    assert KernelInstanceWatch(["no_such_module_for_attnserve"]).kernels == {}
