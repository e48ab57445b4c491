"""Server-sent events, client-disconnect detection, and the server's forced stop.

A request's work races a watcher that waits for the ASGI `http.disconnect` message, so a
client that goes away is noticed while its request is still queued (no bytes to send yet)
as well as mid-stream, and the server's `stopping` event (a second SIGTERM/SIGINT). The
losers are cancelled; cancelling the work closes its `RequestStream`, which aborts the
engine requests. A stopped stream ends with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")
DONE_EVENT = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its response was complete. `submitted`: the
    request had reached the engine, which counts it (finished_reason="abort")."""

    def __init__(self, submitted: bool = True) -> None:
        super().__init__("the client disconnected")
        self.submitted = submitted


class ServerStopping(Exception):
    """The server was told to stop now (a second signal): open responses end at once."""


STOPPING_MESSAGE = "the server is shutting down; the request was not completed"


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, T],
                               stopping: asyncio.Event) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected;
    if the server is stopping first, cancel it and raise ServerStopping."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    stop_watcher = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work_task, watcher, stop_watcher},
                           return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        for task in (watcher, stop_watcher, work_task):
            task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        raise
    watcher_done = watcher.done()
    watcher.cancel()
    stop_watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        # Let the cancellation run the work's cleanup (stream close -> engine abort).
        await asyncio.gather(work_task, return_exceptions=True)
        if watcher_done:
            raise ClientDisconnected()
        raise ServerStopping()
    return work_task.result()


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=True)
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def error_event(message: str, type: str, code: str) -> str:
    """The SSE event that ends a stream that could not complete (OpenAI's error shape)."""
    return sse_event({"error": {"message": message, "type": type, "param": None, "code": code}})


class SSEResponse(Response):
    """Streams `events` (already formatted SSE strings) and calls `on_close` when done,
    whether the stream ended, failed, the client went away or the server stopped."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[str], on_close: Callable[[bool], Awaitable[None]],
        stopping: asyncio.Event,
    ) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})

        async def pump() -> None:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        disconnected = False
        try:
            await run_until_disconnect(receive, pump(), self.stopping)
        except (ClientDisconnected, OSError):
            disconnected = True
            logger.info("client disconnected mid-stream")
        except ServerStopping:
            last = error_event(STOPPING_MESSAGE, "service_unavailable_error", "shutting_down")
            await send({"type": "http.response.body", "body": (last + DONE_EVENT).encode(),
                        "more_body": False})
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.on_close(disconnected)
