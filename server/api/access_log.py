"""One access-log line per HTTP request: method, path, status, latency and, when the request
generated, its prompt and completion tokens (logger `attnserve.access`, INFO; off with
--disable-log-requests).

The middleware puts a fresh `AccessRecord` in a context variable; the code that collects a
request's outputs (non-streaming or streaming: both run in tasks that inherit the context)
fills in the token counts. The line is written once the response has been sent in full.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("attnserve.access")


@dataclass
class AccessRecord:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar(
    "attnserve_access_record", default=None)


def note_tokens(prompt_tokens: int, completion_tokens: int) -> None:
    """Record the current request's token counts (a no-op when access logging is off)."""
    record = _current.get()
    if record is not None:
        record.prompt_tokens = prompt_tokens
        record.completion_tokens = completion_tokens


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = AccessRecord()
        token = _current.set(record)
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _current.reset(token)
            ms = (time.perf_counter() - start) * 1000
            tokens = "" if record.prompt_tokens is None else (
                f" prompt_tokens={record.prompt_tokens} "
                f"completion_tokens={record.completion_tokens}")
            client = scope.get("client")
            who = f"{client[0]}:{client[1]} " if client else ""
            logger.info("%s%s %s %d %.1fms%s", who, scope["method"], scope["path"],
                        status or 500, ms, tokens)
