"""The engine thread and its asyncio bridge.

`EngineCore.step()` runs on one dedicated thread. When nothing is in flight the thread
sleeps on a `threading.Event` that `submit`/`abort` set, so an idle server uses no CPU.
Outputs travel back through the request's sink, which hops onto the event loop with
`loop.call_soon_threadsafe` and lands in an `asyncio.Queue` owned by the HTTP request.

Admission control lives here too: a limit on requests that have not produced output yet
(503 beyond it), a draining state for SIGTERM, and detection of a dead engine thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from scheduler.request import SamplingParams
from scheduler.validation import RequestRejected
from server.engine.choices import ChoiceGroup
from server.engine.core import EngineCore
from server.engine.output_processor import OutputSink
from server.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    BROKEN = "broken"


class EngineUnavailable(Exception):
    """The engine cannot take this request now (starting, draining, broken, full queue)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Pending:
    """Loop-side state of one engine request."""

    stream: RequestStream
    index: int
    got_output: bool = False
    finished: bool = False


@dataclass
class RequestStream:
    """The outputs of one HTTP request's engine requests (prompts x samples), tagged by their
    choice index (server/engine/choices.py).

    Iterate with `async for index, output in stream`; always `await stream.aclose()` (or use
    `async with`) so that requests still running when the consumer stops are aborted.
    """

    engine: AsyncEngine
    request_ids: list[str]  # the engine requests (prompts x samples)
    group: ChoiceGroup | None = None  # None: one choice per engine request
    queue: asyncio.Queue[tuple[int, RequestOutput]] = field(default_factory=asyncio.Queue)
    num_finished: int = 0
    closed: bool = False

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.request_ids)

    @property
    def num_choices(self) -> int:
        """Choices of the response: prompts x n (fewer than request_ids with best_of > n)."""
        return self.group.num_choices if self.group is not None else len(self.request_ids)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while not self.done:
            index, out = await self.queue.get()
            if out.finished:
                self.num_finished += 1
            if self.group is None:
                yield index, out
                continue
            for choice in self.group.add(index, out):
                yield choice

    async def aclose(self) -> None:
        """Abort whatever has not finished; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.engine._close_stream(self)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncEngine:
    """Owns the engine thread; `submit` is called from the event loop's thread only."""

    def __init__(self, build_core: Callable[[], EngineCore], max_queued_requests: int) -> None:
        self._build_core = build_core
        self.max_queued_requests = max_queued_requests
        self.core: EngineCore | None = None
        self.state = EngineState.STARTING
        self.failure: str | None = None  # why the engine is broken
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}  # request id -> state; touched on the loop only
        self._num_queued = 0  # submitted requests with no output yet
        self._idle = asyncio.Event()  # set when nothing is pending
        self._ready = threading.Event()
        self.on_fatal: Callable[[str], None] | None = None  # engine thread: load failed
        # EngineCore.stats() as of the end of the last step, taken on the engine thread so
        # that readers on other threads see a consistent snapshot.
        self.stats_snapshot: dict[str, object] = {}

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (after in-flight work was drained or aborted)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.core is not None:
            self.core.shutdown()
        if self.state is not EngineState.BROKEN:
            self.state = EngineState.STOPPED

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop that `submit`/`generate` must be called on (set by `start`)."""
        return self._loop

    @property
    def thread_native_id(self) -> int | None:
        return self._thread.native_id

    @property
    def thread_alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> tuple[bool, str]:
        """(healthy, state name); a dead engine thread makes the engine broken."""
        if self.state in (EngineState.READY, EngineState.DRAINING) and not self._thread.is_alive():
            self._mark_broken("the engine thread exited unexpectedly")
        return self.state is EngineState.READY, self.state.value

    # ---- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.core = self._build_core()
        except BaseException as e:
            logger.exception("engine failed to start")
            self._mark_broken(f"engine failed to start: {e}")
            self._ready.set()
            if self.on_fatal is not None:
                self.on_fatal(str(e))
            return
        core = self.core
        core.set_failure_handler(self._on_engine_failure)
        if self.state is EngineState.STARTING:
            self.state = EngineState.READY
        self._ready.set()
        self.stats_snapshot = core.stats()
        try:
            while True:
                self._wake.clear()  # cleared before the checks, so no wake-up is lost
                if self._stop.is_set():
                    break
                if not core.has_unfinished():
                    due = core.stats_due_in()  # the last interval's stats line, if pending
                    if not self._wake.wait(due) and due is not None:
                        core.flush_stats()
                    continue
                core.step()
                self.stats_snapshot = core.stats()
        except BaseException as e:  # the step loop itself failed: nothing more will run
            logger.exception("engine thread crashed")
            # The server stays up so /health can report it (503) and requests fail fast.
            self._mark_broken(f"engine thread crashed: {type(e).__name__}: {e}")

    def _on_engine_failure(self, reason: str) -> None:
        """The engine cannot run steps any more (a tensor-parallel rank died): fail what is
        in flight, refuse what comes, stop the step loop."""
        self._mark_broken(reason)
        self._stop.set()
        self._wake.set()

    def _mark_broken(self, reason: str) -> None:
        self.state = EngineState.BROKEN
        self.failure = reason
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fail_all, reason)

    def _fail_all(self, reason: str) -> None:
        for rid in list(self._pending):
            pending = self._pending[rid]
            if not pending.finished:
                self._deliver(rid, RequestOutput(
                    request_id=rid, new_token_ids=[], new_text="", finished=True,
                    finish_reason="abort", num_prompt_tokens=0, num_output_tokens=0,
                    error=reason,
                ))

    # ---- requests (event-loop thread) -----------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._pending)

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def check_admission(self, num_requests: int = 1) -> None:
        """Raise EngineUnavailable unless `num_requests` more can be admitted now."""
        healthy, state = self.health()
        if not healthy:
            detail = f": {self.failure}" if self.failure else ""
            raise EngineUnavailable(f"the engine is {state}{detail}", state)
        if self._num_queued + num_requests > self.max_queued_requests:
            raise EngineUnavailable(
                f"too many queued requests ({self._num_queued} waiting, limit "
                f"{self.max_queued_requests}); retry later", "queue_full",
            )

    def submit(self, prompts: list[list[int]], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        """Queue `params.num_samples` engine requests per prompt (n, or best_of: see
        server/engine/choices.py). Raises EngineUnavailable or RequestRejected (from the
        engine's validation) before anything is queued. The stream yields (choice index,
        output); `stream.num_choices` = prompts x n."""
        total = len(prompts) * max(1, params.num_samples)
        if total > self.max_queued_requests:  # could never be admitted: not a 503
            what = "prompts" if params.num_samples <= 1 else "prompts x samples (n or best_of)"
            raise RequestRejected(f"at most {self.max_queued_requests} {what} per request "
                                  f"(got {total})", "prompt" if params.num_samples <= 1 else "n")
        self.check_admission(total)
        core = self.core
        assert core is not None
        group = core.add_choice_group(prompts, params, request_id or uuid.uuid4().hex,
                                      self._sink)
        ids_list = group.request_ids
        # Outputs reach _deliver through the loop, so none can arrive before this returns.
        stream = RequestStream(self, ids_list, group)
        for index, rid in enumerate(ids_list):
            self._pending[rid] = _Pending(stream, index)
            self._num_queued += 1
            self._idle.clear()
        self._wake.set()
        return stream

    def _sink(self, rid: str) -> OutputSink:
        loop = asyncio.get_running_loop()

        def sink(out: RequestOutput) -> None:
            # Runs on the engine thread: it must never raise into the step.
            try:
                loop.call_soon_threadsafe(self._deliver, rid, out)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

        return sink

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs; aborts it in the engine if the consumer stops early.

        Iterate inside `contextlib.aclosing(...)` so that stopping early closes the
        generator at once (and with it the request) rather than at garbage collection.
        """
        stream = self.submit([prompt_ids], params, request_id)
        async with stream:
            async for _, out in stream:
                yield out

    def _deliver(self, rid: str, out: RequestOutput) -> None:
        pending = self._pending.get(rid)
        if pending is None or pending.finished:
            return
        if not pending.got_output:
            pending.got_output = True
            self._num_queued -= 1
        if out.finished:
            pending.finished = True
            self._forget(rid)
        if not pending.stream.closed:
            pending.stream.queue.put_nowait((pending.index, out))

    def _forget(self, rid: str) -> None:
        pending = self._pending.pop(rid, None)
        if pending is not None and not pending.got_output:
            pending.got_output = True
            self._num_queued -= 1
        if not self._pending:
            self._idle.set()

    def _close_stream(self, stream: RequestStream) -> None:
        aborted = False
        for rid in stream.request_ids:
            pending = self._pending.get(rid)
            if pending is None or pending.finished:
                continue
            if self.core is not None:
                self.core.abort(rid)
                aborted = True
            self._forget(rid)
        if aborted:
            self._wake.set()

    def abort_all(self) -> int:
        """Abort every in-flight request (their streams end with finish_reason abort)."""
        rids = [rid for rid, p in self._pending.items() if not p.finished]
        if self.core is not None:
            for rid in rids:
                self.core.abort(rid)
        self._wake.set()
        return len(rids)

    async def reset_prefix_cache(self, timeout: float = 30.0) -> int:
        """Drop every cached prefix page no running request uses (EngineCore.
        reset_prefix_cache, applied by the engine thread before its next step); returns how
        many. Raises EngineUnavailable unless the engine is ready or draining, TimeoutError
        if the engine thread does not get to it within `timeout` seconds."""
        _, state = self.health()
        if self.core is None or state not in (EngineState.READY, EngineState.DRAINING):
            raise EngineUnavailable(f"the engine is {state}", state)
        done = self.core.request_reset_prefix_cache()
        self._wake.set()
        return await asyncio.wait_for(asyncio.wrap_future(done), timeout)

    # ---- draining ---------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self.state in (EngineState.READY, EngineState.STARTING):
            self.state = EngineState.DRAINING

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
