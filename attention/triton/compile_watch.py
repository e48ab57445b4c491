"""Notice every Triton kernel instance the process compiles (or loads from Triton's disk cache).

A serving step that meets a kernel specialisation nobody warmed up stalls on the compiler
for up to seconds; this makes those stalls visible. `watch_compiles(listener)` subscribes a
callable that receives a `CompileEvent` after each new instance is ready. The hooks are
Triton's process-wide `knobs.runtime.jit_cache_hook` (called before an instance is built)
and `jit_post_compile_hook` (after); any hooks installed before ours are still called.
Listeners are held weakly when they are bound methods, so an engine that goes away stops
listening without an explicit unsubscribe. Nothing fires under TRITON_INTERPRET=1, where
kernels are interpreted rather than compiled.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileEvent:
    kernel: str  # the jitted function's name, e.g. "_extend_kernel"
    seconds: float  # from the cache miss to the instance being ready


Listener = Callable[[CompileEvent], None]


class _CompileHooks:
    """The process-wide pair of Triton hooks fanning out to the subscribed listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], Listener | None]] = []
        self._started = threading.local()
        self._installed = False
        self._previous_cache_hook: Any = None
        self._previous_post_hook: Any = None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        ref: Callable[[], Listener | None]
        if hasattr(listener, "__self__") and hasattr(listener, "__func__"):
            ref = weakref.WeakMethod(listener)  # type: ignore[arg-type]
        else:
            ref = lambda: listener  # noqa: E731  (a plain function: held strongly)
        with self._lock:
            self._install()
            self._listeners.append(ref)

        def unsubscribe() -> None:
            with self._lock:
                if ref in self._listeners:
                    self._listeners.remove(ref)

        return unsubscribe

    def _install(self) -> None:
        if self._installed:
            return
        try:
            from triton import knobs
        except ImportError:  # Triton older than the knobs API: nothing to watch with
            logger.info("triton.knobs unavailable: kernel compiles are not counted")
            self._installed = True
            return
        runtime = knobs.runtime
        self._previous_cache_hook = runtime.jit_cache_hook
        self._previous_post_hook = runtime.jit_post_compile_hook
        runtime.jit_cache_hook = self.before_compile
        runtime.jit_post_compile_hook = self.after_compile
        self._installed = True

    # Triton calls these with keyword arguments (key, repr, fn, compile, ...). A true return
    # value from the cache hook would make Triton skip the compile, so ours returns what the
    # previous hook returned (None when there was none).
    def before_compile(self, **kwargs: Any) -> Any:
        self._started.at = time.perf_counter()
        if self._previous_cache_hook is not None:
            return self._previous_cache_hook(**kwargs)
        return None

    def after_compile(self, **kwargs: Any) -> Any:
        started = getattr(self._started, "at", None)
        self._started.at = None
        seconds = time.perf_counter() - started if started is not None else 0.0
        fn = kwargs.get("fn")
        event = CompileEvent(str(getattr(fn, "name", fn)), seconds)
        with self._lock:
            listeners = [ref() for ref in self._listeners]
            self._listeners = [ref for ref in self._listeners if ref() is not None]
        for listener in listeners:
            if listener is None:
                continue
            try:
                listener(event)
            except Exception:  # a broken listener must never fail a kernel launch
                logger.exception("kernel compile listener failed")
        if self._previous_post_hook is not None:
            return self._previous_post_hook(**kwargs)
        return None


_HOOKS = _CompileHooks()


def watch_compiles(listener: Listener) -> Callable[[], None]:
    """Call `listener(CompileEvent)` after every new Triton kernel instance; returns an
    unsubscribe function."""
    return _HOOKS.subscribe(listener)
