"""The Starlette application: routes, middleware, and the engine's start-up and shutdown."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.api.access_log import AccessLogMiddleware
from server.api.completions import create_chat_completion, create_completion
from server.api.endpoint import APIKeyMiddleware, AppContext, ServerSettings
from server.api.errors import http_exception_handler, internal_error_handler
from server.api.native import (
    engine_stats,
    generate,
    health,
    list_models,
    metrics,
    reset_prefix_cache,
)
from server.api.openapi import build_openapi
from server.api.prompts import PromptEncoder
from server.api.worker_info import model_info, server_info
from server.engine import AsyncEngine, EngineConfig, EngineCore, EngineMetrics, LoadedModel, parse_buckets

logger = logging.getLogger(__name__)
API_VERSION = "0.1.0"


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Raises ValueError with a message for the user on a bad combination of flags."""
    buckets = getattr(args, "latency_buckets", None)
    origins = getattr(args, "allowed_origins", None)
    return ServerSettings(
        api_key=args.api_key, max_request_bytes=args.max_request_bytes,
        max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
        latency_buckets=parse_buckets(buckets) if buckets else None,
        max_connections=args.max_connections, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, keep_alive_timeout=args.keep_alive_timeout,
        allowed_origins=[o.strip() for o in origins.split(",") if o.strip()] if origins else [],
        replica_name=getattr(args, "replica_name", None),
        leave_pool_delay=getattr(args, "leave_pool_delay", 0.0),
    )


def build_app(config: EngineConfig, settings: ServerSettings,
              loaded: LoadedModel | None = None) -> Starlette:
    """The ASGI app. The engine loads on its own thread once the app starts, so /health
    answers 503 ("starting") until the model is ready."""
    def build_core() -> EngineCore:  # on the engine thread
        core = EngineCore(config, loaded=loaded)
        ctx.metrics = EngineMetrics.attach(core, settings.latency_buckets,
                                           replica=settings.replica_name)
        ctx.prompts = PromptEncoder(core, ctx.pool)
        return core

    ctx = AppContext(engine=AsyncEngine(build_core, settings.max_queued_requests),
                     settings=settings)
    openapi_doc = build_openapi(API_VERSION, with_auth=settings.api_key is not None)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_doc)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.engine.shutdown()
            ctx.pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        Route("/flush_cache", reset_prefix_cache, methods=["POST"]),  # SGLang's name
        *[Route(path, handler, methods=["GET"]) for path, handler in (
            ("/server_info", server_info), ("/get_server_info", server_info),
            ("/model_info", model_info), ("/get_model_info", model_info))],
        Route("/v1/engine/stats", engine_stats, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_key=settings.api_key)]
    if settings.allowed_origins:  # outermost, so that a preflight needs no API key
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"]))
    if not config.disable_log_requests:  # outermost: every request gets its line
        middleware.insert(0, Middleware(AccessLogMiddleware))
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=middleware,
        exception_handlers={HTTPException: http_exception_handler,
                            Exception: internal_error_handler},
    )
    # No redirect from /health/ to /health: Starlette builds its Location from the Host
    # header, which the client chooses.
    app.router.redirect_slashes = False
    app.state.ctx = ctx
    return app


def run_server(config: EngineConfig, args: argparse.Namespace) -> int:
    """`attnserve serve`: serve until SIGTERM/SIGINT; 0 after a clean drain."""
    from server.api.uvicorn_server import serve_forever

    try:
        settings = settings_from_args(args)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    app = build_app(config, settings)
    return serve_forever(app, args.host, args.port, settings.shutdown_timeout)
