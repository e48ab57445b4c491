"""Running the app on uvicorn: graceful drain on SIGTERM, and an in-thread server for tests.

Drain: the first SIGTERM/SIGINT (after --leave-pool-delay seconds during which only
/health fails, when that is set) puts the engine in the draining state (new requests get
503, /health 503) while the socket stays open, waits up to the shutdown timeout for the
running requests, aborts the rest, then lets uvicorn close. A second signal stops at once:
open streams end with an error event and `[DONE]`, waiting requests get a JSON 503, and
the process exits with 128 + the signal number. A third leaves without waiting at all.

Connections are served by `GuardedH11Protocol` (server/api/connections.py): TCP_NODELAY,
header and body deadlines, and the connection cap.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from server.api.connections import (
    ConnectionGuard,
    ConnectionLimits,
    GuardedH11Protocol,
    fit_connection_cap,
    install_log_throttles,
)
from server.api.endpoint import AppContext, ServerSettings

logger = logging.getLogger(__name__)
ABORT_FLUSH_TIMEOUT_S = 5.0  # time for aborted streams to send their last chunk


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: AppContext, shutdown_timeout: float,
                 guard: ConnectionGuard):
        super().__init__(config)
        self.ctx = ctx
        self.engine = ctx.engine
        self.guard = guard
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._drain_requested = False
        self._stop_signal: int | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.engine.on_fatal = self._on_engine_fatal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Replaces uvicorn's handler, which would re-raise the signal after shutdown (exit
        # status -15 instead of 0). Runs between two bytecodes of the loop's thread, so it
        # only sets flags; on_tick acts on them.
        if not self._drain_requested:
            self._drain_requested = True
        elif self._stop_signal is None:
            self._stop_signal = sig
            self.exit_code = 128 + sig
        else:
            self.should_exit = True
            self.force_exit = True

    def request_drain(self) -> None:
        """Start a drain from any thread (what SIGTERM does)."""
        self._drain_requested = True

    def _on_engine_fatal(self, reason: str) -> None:
        logger.error("the engine could not start (%s); exiting", reason)
        self.exit_code = 1
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        if self._stop_signal is not None and self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop_now(self._stop_signal))
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        engine = self.engine
        delay = self.ctx.settings.leave_pool_delay
        if delay > 0:
            # /health fails first, requests are still served: a router's health check takes
            # the worker out of its pool before the drain refuses anything.
            logger.info("leaving the pool: /health answers 503 for %.1f s while requests are "
                        "still served, then the drain starts", delay)
            self.ctx.leaving_pool = True
            await asyncio.sleep(delay)
        logger.info("draining: refusing new requests; %d in flight, waiting up to %.1f s",
                    engine.num_active, self.shutdown_timeout)
        engine.begin_drain()
        if not await engine.wait_idle(self.shutdown_timeout):
            aborted = engine.abort_all()
            logger.warning("shutdown timeout reached: aborted %d requests", aborted)
            await engine.wait_idle(ABORT_FLUSH_TIMEOUT_S)
        logger.info("drained; shutting down")
        self.should_exit = True

    async def _stop_now(self, sig: int) -> None:
        engine = self.engine
        logger.warning("second %s: ending %d open requests now (streams get an error event, "
                       "others 503) and exiting with status %d", signal.Signals(sig).name,
                       engine.num_active, self.exit_code)
        engine.begin_drain()
        self.ctx.stopping.set()  # every open response ends itself and aborts its requests
        if not await engine.wait_idle(ABORT_FLUSH_TIMEOUT_S):
            engine.abort_all()
            await engine.wait_idle(ABORT_FLUSH_TIMEOUT_S)
        self.should_exit = True


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (GuardedH11Protocol sets it as well).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _make_server(app: Starlette, shutdown_timeout: float) -> DrainingServer:
    ctx: AppContext = app.state.ctx
    settings = ctx.settings
    install_log_throttles()
    limits = ConnectionLimits(max_connections=fit_connection_cap(settings.max_connections),
                              header_timeout=settings.header_timeout,
                              body_timeout=settings.body_timeout)
    guard = ConnectionGuard(limits)
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, access_log=False,
        http=GuardedH11Protocol.factory(guard),
        timeout_graceful_shutdown=int(ABORT_FLUSH_TIMEOUT_S),
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
    )
    return DrainingServer(config, ctx, shutdown_timeout, guard)


def serve_forever(app: Starlette, host: str, port: int, shutdown_timeout: float) -> int:
    """Serve on the main thread until drained; returns the process exit status."""
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    server = _make_server(app, shutdown_timeout)
    # CLI output at any log level: scripts and tests parse it to learn the port of --port 0.
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"attnserve listening on http://{shown_host}:{bound_port}", flush=True)
    server.run(sockets=[sock])
    return server.exit_code


class ServerThread:
    """The app on uvicorn in a background thread (in-process tests and tools)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = ServerSettings.shutdown_timeout) -> None:
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _make_server(app, shutdown_timeout)
        self.ctx: AppContext = app.state.ctx
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float = 300.0) -> ServerThread:
        self._thread.start()
        if not self.ctx.engine.wait_ready(ready_timeout):
            raise TimeoutError(f"the engine did not load within {ready_timeout} s")
        if self.ctx.engine.failure:
            raise RuntimeError(self.ctx.engine.failure)
        return self

    def drain(self) -> None:
        self.server.request_drain()

    def stop(self, timeout: float = 60.0) -> None:
        self.server.request_drain()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.server.force_exit = True
            self.server.should_exit = True
            self._thread.join(10)
