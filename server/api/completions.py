"""POST /v1/completions and POST /v1/chat/completions (OpenAI-compatible)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.convert import (
    Accumulated,
    chat_logprobs,
    collect,
    completion_logprobs,
    delta_events,
    sampling_params,
    stream_response,
    usage_of,
)
from server.api.endpoint import AppContext, api_endpoint
from server.api.protocol import (
    AssistantMessage,
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
)
from server.api.sse import DONE_EVENT, sse_event
from server.engine import EngineCore, RequestOutput, RequestStream

# ---- completions ---------------------------------------------------------------------------


@api_endpoint
async def create_completion(request: Request, ctx: AppContext) -> Response:
    body = await ctx.read_body(request, CompletionRequest)
    ctx.check_model(body.model)
    core, encoder = ctx.ready_prompts()
    prompts = await encoder.encode_prompts(body.prompt_list())
    params = sampling_params(body, body.max_tokens, body.logprobs)
    request_id, stream = ctx.submit(prompts, params, "cmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _completion_events(core, stream, request_id, include_usage,
                                    body.logprobs is not None)
        return stream_response(stream, events, ctx.stopping)
    results = await collect(request.receive, stream, ctx.stopping, ctx.settings.retry_after_s)
    choices = [
        CompletionChoice(
            index=i, text=r.text, finish_reason=r.finish_reason,  # type: ignore[arg-type]
            logprobs=completion_logprobs(core, r.logprobs) if body.logprobs is not None else None,
        )
        for i, r in enumerate(results)
    ]
    response = CompletionResponse(id=request_id, model=core.model_name, choices=choices,
                                  usage=usage_of(results))
    return JSONResponse(response.model_dump())


async def _completion_events(core: EngineCore, stream: RequestStream, request_id: str,
                             include_usage: bool, want_logprobs: bool) -> AsyncIterator[str]:
    created = int(time.time())
    results = [Accumulated() for _ in stream.request_ids]

    def chunk(index: int, out: RequestOutput, offset: int) -> CompletionChunk:
        choice = CompletionChoice(
            index=index, text=out.new_text,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            logprobs=completion_logprobs(core, out.new_logprobs, offset) if want_logprobs
            else None,
        )
        return CompletionChunk(id=request_id, created=created, model=core.model_name,
                               choices=[choice])

    async for event in delta_events(stream, results, chunk):
        yield event
    if include_usage:
        yield sse_event(CompletionChunk(id=request_id, created=created, model=core.model_name,
                                        choices=[], usage=usage_of(results)))
    yield DONE_EVENT


# ---- chat ------------------------------------------------------------------------------------


@api_endpoint
async def create_chat_completion(request: Request, ctx: AppContext) -> Response:
    body = await ctx.read_body(request, ChatCompletionRequest)
    ctx.check_model(body.model)
    core, encoder = ctx.ready_prompts()
    prompt = await encoder.encode_chat([{"role": m.role, "content": m.text()}
                                        for m in body.messages])
    requested = body.requested_max_tokens()
    # Without a limit, generate up to the context length (at least one token, so a prompt
    # that fills the context is rejected by validation with a clear message).
    max_tokens = requested if requested is not None else max(1, core.max_model_len - len(prompt))
    top_n = body.top_logprobs or 0
    params = sampling_params(body, max_tokens, top_n if body.logprobs else None)
    request_id, stream = ctx.submit([prompt], params, "chatcmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _chat_events(core, stream, request_id, include_usage,
                              top_n if body.logprobs else None)
        return stream_response(stream, events, ctx.stopping)
    (result,) = await collect(request.receive, stream, ctx.stopping,
                              ctx.settings.retry_after_s)
    choice = ChatCompletionChoice(
        index=0, message=AssistantMessage(content=result.text),
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        logprobs=chat_logprobs(core, result.logprobs, top_n) if body.logprobs else None,
    )
    response = ChatCompletionResponse(id=request_id, model=core.model_name, choices=[choice],
                                      usage=usage_of([result]))
    return JSONResponse(response.model_dump())


async def _chat_events(core: EngineCore, stream: RequestStream, request_id: str,
                       include_usage: bool, top_n: int | None) -> AsyncIterator[str]:
    created = int(time.time())
    result = Accumulated()
    role_sent = False

    def chunk(index: int, out: RequestOutput, offset: int) -> ChatCompletionChunk:
        nonlocal role_sent
        # The role rides on the first chunk that carries content (or the last one).
        delta = ChatDelta(role=None if role_sent else "assistant", content=out.new_text)
        role_sent = True
        choice = ChatChunkChoice(
            index=0, delta=delta,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            logprobs=chat_logprobs(core, out.new_logprobs, top_n) if top_n is not None
            else None,
        )
        return ChatCompletionChunk(id=request_id, created=created, model=core.model_name,
                                   choices=[choice])

    async for event in delta_events(stream, [result], chunk):
        yield event
    if include_usage:
        yield sse_event(ChatCompletionChunk(id=request_id, created=created,
                                            model=core.model_name, choices=[],
                                            usage=usage_of([result])))
    yield DONE_EVENT
