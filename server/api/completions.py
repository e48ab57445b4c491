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
    with_prompt_logprobs,
)
from server.api.endpoint import AppContext, api_endpoint
from server.api.errors import bad_request
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
    if body.stream and body.best_of is not None and body.best_of != body.n:
        # best_of's choices are known only once every candidate has finished (vLLM too)
        raise bad_request("best_of can only differ from n when stream is false", "best_of",
                          code="invalid_value")
    core, encoder = ctx.ready_prompts()
    raw_prompts = body.prompt_list()
    prompts = await encoder.encode_prompts(raw_prompts)
    echo_lps = body.logprobs if body.echo and body.logprobs is not None else None
    params = sampling_params(body, body.max_tokens, body.logprobs, best_of=body.best_of,
                             prompt_logprobs=echo_lps)
    request_id, stream = ctx.submit(prompts, params, "cmpl")  # validates token ids first
    echoes = [p if isinstance(p, str) else core.tokenizer.decode(p) for p in raw_prompts] \
        if body.echo else None
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _completion_events(core, stream, request_id, include_usage, body, echoes,
                                    prompts)
        return stream_response(stream, events, ctx.stopping)
    results = await collect(request.receive, stream, ctx.stopping, ctx.settings.retry_after_s)
    choices = []
    for i, r in enumerate(results):
        prompt_text = echoes[i // body.n] if echoes is not None else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(core, r.logprobs, len(prompt_text))
            if echoes is not None:
                logprobs = with_prompt_logprobs(core, prompts[i // body.n], r.prompt_logprobs,
                                                logprobs)
        choices.append(CompletionChoice(
            index=i, text=prompt_text + r.text, logprobs=logprobs,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        ))
    response = CompletionResponse(id=request_id, model=core.model_name, choices=choices,
                                  usage=usage_of(results, body.n))
    return JSONResponse(response.model_dump())


async def _completion_events(core: EngineCore, stream: RequestStream, request_id: str,
                             include_usage: bool, body: CompletionRequest,
                             echoes: list[str] | None,
                             prompts: list[list[int]]) -> AsyncIterator[str]:
    created = int(time.time())
    results = [Accumulated() for _ in range(stream.num_choices)]
    echoed: set[int] = set()
    want_logprobs = body.logprobs is not None

    def chunk(index: int, out: RequestOutput, offset: int) -> CompletionChunk:
        prefix = ""
        logprobs = completion_logprobs(core, out.new_logprobs, offset) if want_logprobs \
            else None
        if echoes is not None and index not in echoed:  # the prompt rides on the first chunk
            echoed.add(index)
            prefix = echoes[index // body.n]
            if logprobs is not None:
                logprobs = with_prompt_logprobs(core, prompts[index // body.n],
                                                out.prompt_logprobs, logprobs)
        elif echoes is not None and logprobs is not None:
            shift = len(echoes[index // body.n])
            logprobs.text_offset = [o + shift for o in logprobs.text_offset]
        choice = CompletionChoice(
            index=index, text=prefix + out.new_text,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            logprobs=logprobs,
        )
        return CompletionChunk(id=request_id, created=created, model=core.model_name,
                               choices=[choice])

    async for event in delta_events(stream, results, chunk):
        yield event
    if include_usage:
        yield sse_event(CompletionChunk(id=request_id, created=created, model=core.model_name,
                                        choices=[], usage=usage_of(results, body.n)))
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
    results = await collect(request.receive, stream, ctx.stopping, ctx.settings.retry_after_s)
    choices = [ChatCompletionChoice(
        index=i, message=AssistantMessage(content=r.text),
        finish_reason=r.finish_reason,  # type: ignore[arg-type]
        logprobs=chat_logprobs(core, r.logprobs, top_n) if body.logprobs else None,
    ) for i, r in enumerate(results)]
    response = ChatCompletionResponse(id=request_id, model=core.model_name, choices=choices,
                                      usage=usage_of(results, body.n))
    return JSONResponse(response.model_dump())


async def _chat_events(core: EngineCore, stream: RequestStream, request_id: str,
                       include_usage: bool, top_n: int | None) -> AsyncIterator[str]:
    created = int(time.time())
    results = [Accumulated() for _ in range(stream.num_choices)]
    role_sent: set[int] = set()

    def chunk(index: int, out: RequestOutput, offset: int) -> ChatCompletionChunk:
        # The role rides on each choice's first chunk.
        delta = ChatDelta(role=None if index in role_sent else "assistant", content=out.new_text)
        role_sent.add(index)
        choice = ChatChunkChoice(
            index=index, delta=delta,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            logprobs=chat_logprobs(core, out.new_logprobs, top_n) if top_n is not None
            else None,
        )
        return ChatCompletionChunk(id=request_id, created=created, model=core.model_name,
                                   choices=[choice])

    async for event in delta_events(stream, results, chunk):
        yield event
    if include_usage:
        n = stream.num_choices  # one prompt: every choice shares it
        yield sse_event(ChatCompletionChunk(id=request_id, created=created,
                                            model=core.model_name, choices=[],
                                            usage=usage_of(results, n)))
    yield DONE_EVENT
