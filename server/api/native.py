"""Native and operational endpoints: /generate, /v1/models, /health, /metrics, engine stats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.convert import (
    Accumulated,
    collect,
    engine_error_event,
    note_usage,
    request_timing,
    sampling_params,
    stream_response,
)
from server.api.endpoint import AppContext, api_endpoint
from server.api.errors import error_response, service_unavailable
from server.api.protocol import (
    EngineStatsResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    NativeSamplingParams,
)
from server.api.sse import DONE_EVENT, sse_event
from server.engine import EngineCore, RequestStream


def meta_info(request_id: str, acc: Accumulated, finished: bool,
              eos_ids: frozenset[int]) -> dict[str, Any]:
    """SGLang's meta_info: running counts, and its object form of the finish reason."""
    finish: dict[str, Any] | None = None
    if finished:
        if acc.finish_reason == "length":
            finish = {"type": "length", "length": acc.num_output_tokens}
        elif acc.finish_reason == "stop":
            last = acc.token_ids[-1] if acc.token_ids else None
            finish = {"type": "stop", "matched": last if last in eos_ids else None}
        else:
            finish = {"type": acc.finish_reason or "abort"}
    return {"id": request_id, "prompt_tokens": acc.num_prompt_tokens,
            "completion_tokens": acc.num_output_tokens, "cached_tokens": acc.num_cached_tokens,
            "finish_reason": finish}


def _stop_ids(core: EngineCore, sp: NativeSamplingParams) -> frozenset[int]:
    return frozenset(sp.stop_token_ids) | frozenset(core.tokenizer.eos_token_ids)


@api_endpoint
async def generate(request: Request, ctx: AppContext) -> Response:
    """Native generation (SGLang's /generate form, attnserve's fields alongside): token ids
    in or text in; token ids, timing and SGLang's meta_info out."""
    body = await ctx.read_body(request, GenerateRequest)
    ctx.check_model(body.model)
    core, encoder = ctx.ready_prompts()
    prompt = (await encoder.encode_prompts([body.input_ids if body.input_ids is not None
                                            else body.text]))[0]  # type: ignore[list-item]
    sp = body.sampling_params
    params = sampling_params(sp, sp.length_limit(), sp.logprobs, min_tokens=sp.min_length())
    request_id, stream = ctx.submit([prompt], params, "gen")
    stop_ids = _stop_ids(core, sp)
    if body.stream:
        return stream_response(stream, _generate_events(stream, request_id, stop_ids),
                               ctx.stopping)
    results = await collect(request.receive, stream, ctx.stopping, ctx.settings.retry_after_s)
    responses = [GenerateResponse(
        request_id=request_id, index=i, text=r.text, output_ids=r.token_ids,
        finish_reason=r.finish_reason,  # type: ignore[arg-type]
        prompt_tokens=r.num_prompt_tokens, completion_tokens=r.num_output_tokens,
        cached_tokens=r.num_cached_tokens,
        logprobs=[lp.logprob for lp in r.logprobs] if sp.logprobs is not None else None,
        timing=r.timing(), meta_info=meta_info(request_id, r, True, stop_ids),
    ).model_dump() for i, r in enumerate(results)]
    return JSONResponse(responses[0] if len(responses) == 1 else responses)


async def _generate_events(stream: RequestStream, request_id: str,
                           stop_ids: frozenset[int]) -> AsyncIterator[str]:
    """SGLang's convention: each event carries the whole text (and output_ids) so far and
    meta_info; attnserve's delta fields (token_ids, delta_text) ride alongside."""
    results = [Accumulated() for _ in range(stream.num_choices)]
    async for index, out in stream:
        acc = results[index]
        acc.add(out)
        if out.error:
            yield engine_error_event(out.error)
            continue
        chunk = GenerateChunk(
            request_id=request_id, index=index, text=acc.text, output_ids=list(acc.token_ids),
            delta_text=out.new_text, token_ids=out.new_token_ids, finished=out.finished,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            completion_tokens=out.num_output_tokens,
            timing=request_timing(out.arrival_time, out.first_token_time, out.finish_time)
            if out.finished else None,
            meta_info=meta_info(request_id, acc, out.finished, stop_ids),
        )
        yield sse_event(chunk)
    note_usage(stream, results)
    yield DONE_EVENT


@api_endpoint
async def reset_prefix_cache(request: Request, ctx: AppContext) -> Response:
    """Drop every cached prefix page no running request uses (vLLM's endpoint)."""
    try:
        evicted = await ctx.engine.reset_prefix_cache()
    except TimeoutError:
        raise service_unavailable("the engine did not reset its prefix cache in time",
                                  "timeout", ctx.settings.retry_after_s, "") from None
    return JSONResponse({"success": True, "evicted_pages": evicted})


@api_endpoint
async def list_models(request: Request, ctx: AppContext) -> Response:
    core = ctx.ready_core()
    card = ModelCard(id=core.model_name, created=ctx.created, root=core.model_name,
                     max_model_len=core.max_model_len, permission=[{
                         "id": f"modelperm-{core.model_name}", "object": "model_permission",
                         "created": ctx.created, "allow_create_engine": False,
                         "allow_sampling": True, "allow_logprobs": True,
                         "allow_search_indices": False, "allow_view": True,
                         "allow_fine_tuning": False, "organization": "*", "group": None,
                         "is_blocking": False}])
    return JSONResponse(ModelList(data=[card]).model_dump())


async def health(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    healthy, state = ctx.engine.health()
    if healthy and ctx.leaving_pool:
        return error_response(503, "the server is leaving the pool: it still serves requests "
                              "for a few seconds, then drains and stops",
                              "service_unavailable_error", code="draining",
                              headers={"Retry-After": str(ctx.settings.retry_after_s)})
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
