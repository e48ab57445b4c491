"""Connection-level defences of the HTTP server: TCP_NODELAY, read timeouts, a connection cap.

uvicorn's h11 protocol has none of these for a connection that has not sent a complete
request: its keep-alive timer only runs between requests, and `limit_concurrency` is
checked after the headers arrived. `GuardedH11Protocol` adds them:
- TCP_NODELAY on every accepted socket (without it, a response written in two sends waits
  for the client's delayed ACK: 40 ms per small response on a reused connection);
- a deadline for the request line and headers (`header_timeout`), and one for the body
  once the headers are in (`body_timeout`): 408 and close;
- at most `max_connections` open connections: at the cap, the oldest connection that is
  not serving a request (idle keep-alive, or a request still arriving) is closed to make
  room; if every connection is serving one, the new connection gets 503 and is closed.
Refusals are logged at most once a second per kind, with the count of the ones not shown.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

logger = logging.getLogger(__name__)

LINGER_S = 1.0  # how long a refused connection may take to read its 503 before it is reset
FD_HEADROOM = 64  # file descriptors kept free beyond the open connections (logs, the model...)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    body_timeout: float


def canned_response(status: int, reason: str, message: str, code: str,
                    retry_after_s: int | None = None) -> bytes:
    """A complete `Connection: close` response with an OpenAI-style error body, for the
    places where no ASGI app is involved."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"
                                 if status < 500 else "service_unavailable_error",
                                 "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RateLimitFilter(logging.Filter):
    """Lets through at most one record a second per message kind (the format string's first
    line), and says how many were held back; tracebacks of throttled kinds are dropped.
    `prefixes`: only messages starting with one of them are throttled (None: all)."""

    def __init__(self, prefixes: tuple[str, ...] | None = None, interval_s: float = 1.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg).split("\n", 1)[0][:120]
        if self.prefixes is not None and not key.startswith(self.prefixes):
            return True
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        record.exc_info = None  # a hostile client must not be able to fill the log
        record.exc_text = None
        if held:
            record.msg = f"{record.msg} (and {held} more like it since the last report)"
        return True


# Third-party messages that a hostile client can produce at will.
_THROTTLED = {
    "uvicorn.error": ("Invalid HTTP request received", "Exceeded concurrency limit",
                      "Unsupported upgrade request"),
    "asyncio": ("socket.accept() out of system resource",),
}


def install_log_throttles() -> None:
    """Idempotent: one throttle per logger, for the process."""
    targets = [(logging.getLogger(name), prefixes) for name, prefixes in _THROTTLED.items()]
    targets.append((logger, None))
    for log, prefixes in targets:
        if not any(isinstance(f, RateLimitFilter) for f in log.filters):
            log.addFilter(RateLimitFilter(prefixes))


def max_lingering(cap: int) -> int:
    """Refused connections allowed to read their 503 at once; beyond, they are reset."""
    return max(16, cap // 4)


def fit_connection_cap(requested: int) -> int:
    """The connection cap that the process's file-descriptor limit can hold (the open
    connections, the refused ones reading their 503, and headroom): raises the soft limit
    towards the hard one if needed, else lowers the cap (with a warning), so that the accept
    loop never meets EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64

    def needed(cap: int) -> int:
        return cap + max_lingering(cap) + in_use + FD_HEADROOM

    if needed(requested) > soft:
        target = needed(requested) if hard == resource.RLIM_INFINITY \
            else min(needed(requested), hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # not allowed here: the cap is lowered below instead
            pass
    fitted = requested
    while fitted > 1 and needed(fitted) > soft:
        fitted = max(1, min(fitted - 1, (soft - in_use - FD_HEADROOM) * 4 // 5))
    if fitted < requested:
        logger.warning("--max-connections %d does not fit the file-descriptor limit %d "
                       "(%d in use): capping connections at %d", requested, soft, in_use, fitted)
    return fitted


class ConnectionGuard:
    """What all connections of one server share: the open ones and the idle ones, each oldest
    first, and the cap."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion order: oldest first
        # the open ones not serving a request, in the order they became idle: eviction picks
        # the first without scanning past the busy ones (long streams)
        self.idle: dict[GuardedH11Protocol, None] = {}
        self.lingering = 0  # refused connections still reading their 503
        self.accepted = 0
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0

    def admit(self, conn: GuardedH11Protocol) -> bool:
        if len(self.open) >= self.limits.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                self.refused += 1
                logger.warning("connection cap of %d reached and every connection is serving "
                               "a request: refusing new connections with 503",
                               self.limits.max_connections)
                return False
            self.evicted += 1
            logger.warning("connection cap of %d reached: closing the oldest idle connections "
                           "(keep-alive, or a request still arriving) to make room",
                           self.limits.max_connections)
            victim.evict()
        self.open[conn] = None
        self.idle[conn] = None
        self.accepted += 1
        return True

    def track(self, conn: GuardedH11Protocol) -> None:
        """Record whether `conn` is serving a request now."""
        if conn not in self.open:
            return
        if conn.idle:
            self.idle.setdefault(conn, None)
        else:
            self.idle.pop(conn, None)

    def release(self, conn: GuardedH11Protocol) -> None:
        self.open.pop(conn, None)
        self.idle.pop(conn, None)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the defences described in the module docstring."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 guard: ConnectionGuard) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self._refused = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._read_phase: str | None = None

    @classmethod
    def factory(cls, guard: ConnectionGuard) -> Any:
        """What uvicorn's `Config(http=...)` takes: builds one protocol per connection."""
        return functools.partial(cls, guard=guard)

    @property
    def idle(self) -> bool:
        """Not serving a request: waiting for one (keep-alive) or for the rest of one."""
        return self.cycle is None or self.cycle.response_complete

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # the peer already went away
                pass
        if not self.guard.admit(self):
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._update_read_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped, so that closing does not reset the 503 away
        super().data_received(data)
        self.guard.track(self)
        self._update_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.guard.track(self)

    def eof_received(self) -> bool | None:
        if self._refused:
            self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        if self._refused:
            self.guard.lingering -= 1
            return
        self.guard.release(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (h11 could not parse it): a JSON 400 instead of uvicorn's text."""
        self.transport.write(canned_response(400, "Bad Request", "invalid HTTP request",
                                             "invalid_http"))
        self.transport.close()

    # ---- refusal and eviction ----------------------------------------------------------
    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        self.guard.lingering += 1
        if self.guard.lingering > max_lingering(self.guard.limits.max_connections):
            transport.abort()  # too many already lingering: free the descriptor now
            return
        transport.write(canned_response(
            503, "Service Unavailable", "the server has reached its connection limit; retry "
            "later", "too_many_connections", retry_after_s=1))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, transport.abort)

    def evict(self) -> None:
        self.guard.release(self)
        self._cancel_read_timer()
        if not self.transport.is_closing():
            self.transport.close()

    # ---- read deadlines ----------------------------------------------------------------
    def _update_read_timer(self) -> None:
        """Headers: from the connection's start, or from the first byte of a request on a
        kept-alive one (between requests uvicorn's keep-alive timer rules); body: from the end
        of the headers. Each is a deadline for the whole phase, not an idle gap."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            phase: str | None = "body"
        elif state is h11.IDLE and self.idle:
            phase = "headers"
        else:
            phase = None
        if phase == self._read_phase:
            return
        self._cancel_read_timer()
        if phase is None:
            return
        timeout = self.guard.limits.header_timeout if phase == "headers" \
            else self.guard.limits.body_timeout
        self._read_phase = phase
        self._read_timer = self.loop.call_later(timeout, self._on_read_timeout, phase, timeout)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = None
        self._read_phase = None

    def _on_read_timeout(self, phase: str, timeout: float) -> None:
        self._read_timer = None
        self._read_phase = None
        if self.transport.is_closing():
            return
        self.guard.timed_out += 1
        if phase == "headers":
            logger.warning("closing connections whose request headers did not arrive within "
                           "%g s (408)", timeout)
        else:
            logger.warning("closing connections whose request body did not arrive within "
                           "%g s (408)", timeout)
        if phase == "body" and self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        self._abandon_request(canned_response(
            408, "Request Timeout", f"the request {phase} did not arrive within {timeout:g} s",
            "request_timeout"))

    def shutdown(self) -> None:
        """Server shutdown: a request whose body is still arriving gets 503 now, rather than
        holding the shutdown until its body deadline (uvicorn waits for it, then cancels it
        with a traceback)."""
        if (self.conn.their_state is h11.SEND_BODY and self.cycle is not None
                and not self.cycle.response_started and not self.transport.is_closing()):
            self._abandon_request(canned_response(
                503, "Service Unavailable", "the server is shutting down", "shutting_down",
                retry_after_s=1))
            return
        super().shutdown()

    def _abandon_request(self, response: bytes) -> None:
        """Answer `response` and close; an app waiting for the body sees a disconnect."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's later sends are dropped
            cycle.message_event.set()
        self.transport.write(response)
        self.transport.close()
