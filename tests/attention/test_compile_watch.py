"""attention/triton/compile_watch.py: Triton's compile hooks fan out to listeners, chain with
hooks installed before, and a listener's failure never reaches the kernel launch. Triton
calls the hooks only when it builds a kernel (never under TRITON_INTERPRET), so the tests
call them the way Triton's JIT does: the cache hook, then the post-compile hook."""

from __future__ import annotations

import gc
import threading
from types import SimpleNamespace

import pytest

from attention.triton import compile_watch
from attention.triton.compile_watch import CompileEvent, watch_compiles

knobs = pytest.importorskip("triton").knobs


def build(name: str) -> object:
    """Run Triton's two hooks around one 'compile' of a kernel called `name`; returns what
    the cache hook returned (a true value would make Triton skip the build)."""
    info = SimpleNamespace(name=name, module="tests", jit_function=None)
    skip = knobs.runtime.jit_cache_hook(key="k", repr=name, fn=info, compile={},
                                        is_manual_warmup=False, already_compiled=False)
    knobs.runtime.jit_post_compile_hook(key="k", repr=name, fn=info, compile={},
                                        is_manual_warmup=False, already_compiled=False)
    return skip


def test_listeners_receive_each_build_with_its_kernel_name_and_time() -> None:
    seen: list[CompileEvent] = []
    unsubscribe = watch_compiles(seen.append)
    try:
        assert not build("_decode_kernel")
        build("_merge_kernel")
    finally:
        unsubscribe()
    assert [e.kernel for e in seen] == ["_decode_kernel", "_merge_kernel"]
    assert all(e.seconds >= 0.0 for e in seen)
    build("_extend_kernel")  # after unsubscribing: nothing more arrives
    assert len(seen) == 2


def test_a_bound_method_listener_is_dropped_with_its_object() -> None:
    class Engine:
        def __init__(self, log: list[str]) -> None:
            self.log = log

        def on_compile(self, event: CompileEvent) -> None:
            self.log.append(event.kernel)

    log: list[str] = []
    engine = Engine(log)
    watch_compiles(engine.on_compile)
    build("_a")
    del engine
    gc.collect()
    build("_b")
    assert log == ["_a"]


def test_a_failing_listener_does_not_stop_the_others_or_the_build() -> None:
    seen: list[str] = []

    def broken(event: CompileEvent) -> None:
        raise RuntimeError("listener bug")

    undo = [watch_compiles(broken), watch_compiles(lambda e: seen.append(e.kernel))]
    try:
        build("_k")
    finally:
        for u in undo:
            u()
    assert seen == ["_k"]


def test_hooks_installed_before_ours_are_still_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    hooks = compile_watch._CompileHooks()
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook",
                        lambda **kw: calls.append("cache") or False)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda **kw: calls.append("post"))
    seen: list[str] = []
    hooks.subscribe(lambda e: seen.append(e.kernel))
    assert knobs.runtime.jit_cache_hook == hooks.before_compile
    build("_x")
    assert calls == ["cache", "post"] and seen == ["_x"]


def test_build_times_are_kept_per_thread() -> None:
    seen: list[CompileEvent] = []
    unsubscribe = watch_compiles(seen.append)
    info = SimpleNamespace(name="_t")
    try:
        knobs.runtime.jit_cache_hook(fn=info)  # started on this thread, finished on another
        other = threading.Thread(target=lambda: knobs.runtime.jit_post_compile_hook(fn=info))
        other.start()
        other.join()
        knobs.runtime.jit_post_compile_hook(fn=info)
    finally:
        unsubscribe()
    assert [e.seconds for e in seen][0] == 0.0  # the other thread never saw a start
    assert seen[1].seconds > 0.0
