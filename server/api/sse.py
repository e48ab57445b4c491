"""Server-sent events and client-disconnect detection.

A request's work races a watcher that waits for the ASGI `http.disconnect` message, so a
client that goes away is noticed while its request is still queued (no bytes to send yet)
as well as mid-stream. The loser is cancelled; cancelling the work closes its
`RequestStream`, which aborts the engine requests.
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
    """The client closed the connection before its response was complete."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        watcher.cancel()
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        raise
    watcher.cancel()
    if not work_task.done():
        work_task.cancel()
        # Let the cancellation run the work's cleanup (stream close -> engine abort).
        await asyncio.gather(work_task, return_exceptions=True)
        raise ClientDisconnected()
    return work_task.result()


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=True)
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class SSEResponse(Response):
    """Streams `events` (already formatted SSE strings) and calls `on_close` when done,
    whether the stream ended, failed, or the client went away."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[str], on_close: Callable[[bool], Awaitable[None]],
    ) -> None:
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close

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
            await run_until_disconnect(receive, pump())
        except (ClientDisconnected, OSError):
            disconnected = True
            logger.info("client disconnected mid-stream")
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.on_close(disconnected)
