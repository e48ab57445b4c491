"""Native and operational endpoints: /generate, /v1/models, /health, /metrics, engine stats."""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.convert import (
    Accumulated,
    collect,
    engine_error_event,
    request_timing,
    sampling_params,
    stream_response,
)
from server.api.endpoint import AppContext, api_endpoint
from server.api.errors import error_response
from server.api.protocol import (
    EngineStatsResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from server.api.sse import DONE_EVENT, sse_event
from server.engine import RequestStream


@api_endpoint
async def generate(request: Request, ctx: AppContext) -> Response:
    """Native generation: token ids in or text in, token ids and timing out."""
    body = await ctx.read_body(request, GenerateRequest)
    _, encoder = ctx.ready_prompts()
    prompt = (await encoder.encode_prompts([body.input_ids if body.input_ids is not None
                                            else body.text]))[0]  # type: ignore[list-item]
    sp = body.sampling_params
    params = sampling_params(sp, sp.max_tokens, sp.logprobs, sp.stop_token_ids)
    request_id, stream = ctx.submit([prompt], params, "gen")
    if body.stream:
        return stream_response(stream, _generate_events(stream, request_id), ctx.stopping)
    (r,) = await collect(request.receive, stream, ctx.stopping, ctx.settings.retry_after_s)
    response = GenerateResponse(
        request_id=request_id, text=r.text, output_ids=r.token_ids,
        finish_reason=r.finish_reason,  # type: ignore[arg-type]
        prompt_tokens=r.num_prompt_tokens, completion_tokens=r.num_output_tokens,
        cached_tokens=r.num_cached_tokens,
        logprobs=[lp.logprob for lp in r.logprobs] if sp.logprobs is not None else None,
        timing=r.timing(),
    )
    return JSONResponse(response.model_dump())


async def _generate_events(stream: RequestStream, request_id: str) -> AsyncIterator[str]:
    acc = Accumulated()
    async for _, out in stream:
        acc.add(out)
        if out.error:
            yield engine_error_event(out.error)
            continue
        chunk = GenerateChunk(
            request_id=request_id, text=out.new_text, token_ids=out.new_token_ids,
            finished=out.finished,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            completion_tokens=out.num_output_tokens,
            timing=request_timing(out.arrival_time, out.first_token_time, out.finish_time)
            if out.finished else None,
        )
        yield sse_event(chunk)
    yield DONE_EVENT


@api_endpoint
async def list_models(request: Request, ctx: AppContext) -> Response:
    core = ctx.ready_core()
    card = ModelCard(id=core.model_name, created=ctx.created, max_model_len=core.max_model_len)
    return JSONResponse(ModelList(data=[card]).model_dump())


async def health(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    healthy, state = ctx.engine.health()
    if healthy:
        return JSONResponse(HealthResponse(status="ok").model_dump())
    detail = f": {ctx.engine.failure}" if ctx.engine.failure else ""
    return error_response(503, f"the engine is {state}{detail}", "service_unavailable_error",
                          code=state, headers={"Retry-After": str(ctx.settings.retry_after_s)})


async def metrics(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    if ctx.metrics is None:  # engine still loading: only the process-wide collectors exist
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
    body, content_type = ctx.metrics.render()
    return Response(body, headers={"Content-Type": content_type})


@api_endpoint
async def engine_stats(request: Request, ctx: AppContext) -> Response:
    """EngineCore.stats() plus the HTTP side's counts (for tests and debugging)."""
    raw = ctx.engine.stats_snapshot
    engine = {k: v for k, v in raw.items() if isinstance(v, int | float | str | bool) or v is None}
    stats = EngineStatsResponse(state=ctx.engine.state.value,
                                num_active_requests=ctx.engine.num_active,
                                num_queued_requests=ctx.engine.num_queued, engine=engine)
    return JSONResponse(stats.model_dump())
