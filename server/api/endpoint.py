"""What every API endpoint shares: the app context, body limits, auth, error translation."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import (
    APIError,
    bad_request,
    error_response,
    from_validation_error,
    service_unavailable,
)
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
# Paths that stay reachable without the API key (probes, scrapers, API discovery).
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0
    latency_buckets: list[float] | None = None
    retry_after_s: int = 1


@dataclass
class AppContext:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: EngineMetrics | None = None  # set once the engine has loaded
    created: int = field(default_factory=lambda: int(time.time()))

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


async def read_body_model(request: Request, model: type[M], limit: int) -> M:
    """Read the body (413 beyond `limit` bytes) and validate it (400 on any problem)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes",
                    "invalid_request_error", code="request_too_large", metric_reason="validation")


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
        except ClientDisconnected:  # counted by the engine as finished_reason="abort"
            logger.info("client disconnected before the response; request aborted")
            return Response(status_code=499)  # nobody reads it; keeps the ASGI contract
        except Exception as e:
            logger.exception("internal error in %s %s", request.method, request.url.path)
            ctx.count_failure("error")
            return error_response(500, f"internal server error: {type(e).__name__}: {e}",
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
