"""What every API endpoint shares: the settings, the app context, auth, error translation."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.body import read_body_model as _read_body_model
from server.api.errors import APIError, bad_request, error_response, service_unavailable
from server.api.prompts import PromptEncoder
from server.api.sse import ClientDisconnected
from server.engine import (
    AsyncEngine,
    EngineCore,
    EngineMetrics,
    EngineUnavailable,
    RequestRejected,
    RequestStream,
    SamplingParams,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
# Paths that stay reachable without the API key (probes, scrapers, API discovery, and the
# worker description a router reads at registration: what /metrics' engine_config_info
# already publishes).
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/server_info", "/model_info",
                        "/get_server_info", "/get_model_info"})
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0
    latency_buckets: list[float] | None = None
    retry_after_s: int = 1
    # Connection limits (server/api/connections.py); keep_alive_timeout is uvicorn's own.
    max_connections: int = 2048
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    # Behind a router (docs/replicas.md): the `replica` label of every metric, and the
    # seconds /health says "draining" after SIGTERM while requests are still served, so
    # that the router's health check takes the worker out of its pool before it refuses any.
    replica_name: str | None = None
    leave_pool_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty: an empty key would let any client "
                             "in (`Authorization: Bearer` with no token matches it); leave the "
                             "flag out to serve without a key")
        for name in ("max_request_bytes", "max_queued_requests", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if not self.leave_pool_delay >= 0:
            raise ValueError("--leave-pool-delay must be 0 or more seconds")
        if self.replica_name is not None and not _LABEL_VALUE.fullmatch(self.replica_name):
            raise ValueError(f"--replica-name {self.replica_name!r}: use 1-64 letters, digits, "
                             "'.', '_', ':' or '-' (it becomes a metric label value)")


def _worker_pool() -> ThreadPoolExecutor:
    # Tokenization and large-body parsing. The fast tokenizers release the GIL, so these
    # threads really run in parallel: at most half the cores, to leave the rest to the step.
    return ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)),
                              thread_name_prefix="api-worker")


@dataclass
class AppContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: EngineMetrics | None = None  # set once the engine has loaded
    prompts: PromptEncoder | None = None  # set once the engine has loaded
    created: int = field(default_factory=lambda: int(time.time()))
    pool: ThreadPoolExecutor = field(default_factory=_worker_pool)
    # Set by a second SIGTERM/SIGINT: every open response ends now (503 / an error event).
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by SIGTERM for --leave-pool-delay seconds before the drain: /health answers 503
    # while requests are still taken.
    leaving_pool: bool = False

    def count_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_request_failed(reason)

    def ready_core(self) -> EngineCore:
        """The engine, or a 503 if it cannot take requests now."""
        try:
            self.engine.check_admission(0)
        except EngineUnavailable as e:
            raise service_unavailable(str(e), e.code, self.settings.retry_after_s,
                                      "unavailable") from None
        assert self.engine.core is not None
        return self.engine.core

    def ready_prompts(self) -> tuple[EngineCore, PromptEncoder]:
        """The engine and its prompt encoder, or a 503 if it cannot take requests now."""
        core = self.ready_core()
        assert self.prompts is not None
        return core, self.prompts

    async def read_body(self, request: Request, model: type[M]) -> M:
        return await _read_body_model(request, model, self.settings.max_request_bytes,
                                      self.pool)

    def submit(self, prompts: list[list[int]], params: SamplingParams,
               id_prefix: str) -> tuple[str, RequestStream]:
        """Queue the prompts under a new request id, `<id_prefix>-<hex>`."""
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        return request_id, self.engine.submit(prompts, params, request_id)

    def check_model(self, model: str | None) -> None:
        core = self.ready_core()
        if model is not None and model != core.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{core.model_name}`", "invalid_request_error", "model",
                           "model_not_found", metric_reason="validation")


Handler = Callable[[Request, AppContext], Awaitable[Response]]


def api_endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: errors become OpenAI-style responses and failed-request metrics."""

    async def endpoint(request: Request) -> Response:
        ctx: AppContext = request.app.state.ctx
        try:
            return await handler(request, ctx)
        except APIError as e:
            if e.metric_reason is not None:
                ctx.count_failure(e.metric_reason)
            return e.response()
        except RequestRejected as e:
            ctx.count_failure("validation")
            return bad_request(str(e), e.param).response()
        except EngineUnavailable as e:
            ctx.count_failure("queue_full" if e.code == "queue_full" else "unavailable")
            return service_unavailable(str(e), e.code, ctx.settings.retry_after_s, "").response()
        except ClientDisconnected as e:
            logger.info("client disconnected before the response; request aborted")
            if not e.submitted:  # a submitted one is counted by the engine (finished "abort")
                ctx.count_failure("abort")
            return Response(status_code=499)  # nobody reads it; keeps the ASGI contract
        except Exception:
            logger.exception("internal error in %s %s", request.method, request.url.path)
            ctx.count_failure("error")
            return error_response(500, "internal server error (the server log has the details)",
                                  "server_error", code="internal_error")

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches; the open paths are exempt."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key: send 'Authorization: Bearer <key>'" if not auth \
            else "invalid API key"
        ctx: AppContext | None = getattr(scope.get("app").state, "ctx", None) \
            if scope.get("app") is not None else None
        if ctx is not None:
            ctx.count_failure("auth")
        response = error_response(401, message, "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
