"""Turning requests into engine inputs and engine outputs into response pieces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.types import Receive

from server.api.access_log import note_tokens
from server.api.errors import APIError, bad_request, service_unavailable
from server.api.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    RequestTiming,
    SamplingFields,
    TopLogprob,
    Usage,
)
from server.api.sse import (
    STOPPING_MESSAGE,
    ServerStopping,
    SSEResponse,
    error_event,
    run_until_disconnect,
    sse_event,
)
from server.engine import EngineCore, RequestOutput, RequestStream, SamplingParams, TokenLogprob


def logit_bias_of(raw: dict[str, float] | None) -> dict[int, float] | None:
    """JSON's string keys as token ids; a key that is not an integer is a 400."""
    if raw is None:
        return None
    out = {}
    for key, bias in raw.items():
        try:
            out[int(key)] = bias
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers), got {key!r}",
                              "logit_bias", code="invalid_value") from None
    return out


def sampling_params(fields: SamplingFields, max_tokens: int, logprobs: int | None, *,
                    min_tokens: int | None = None, best_of: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
        top_k=fields.top_k, min_p=fields.min_p, seed=fields.seed, stop=fields.stop_list(),
        stop_token_ids=list(fields.stop_token_ids), ignore_eos=fields.ignore_eos,
        logprobs=logprobs, presence_penalty=fields.presence_penalty,
        frequency_penalty=fields.frequency_penalty,
        repetition_penalty=fields.repetition_penalty,
        logit_bias=logit_bias_of(fields.logit_bias),
        min_tokens=fields.min_tokens if min_tokens is None else min_tokens,
        n=fields.n, best_of=best_of, prompt_logprobs=prompt_logprobs,
    )


@dataclass
class Accumulated:
    """Everything one engine request produced, merged from its deltas."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.logprobs.extend(out.new_logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.arrival_time = out.arrival_time or self.arrival_time
        self.first_token_time = out.first_token_time or self.first_token_time
        if out.finished:
            self.finish_reason = out.finish_reason
            self.finish_time = out.finish_time
            self.error = out.error

    def timing(self) -> RequestTiming:
        return request_timing(self.arrival_time, self.first_token_time, self.finish_time)


def request_timing(arrival: float, first: float | None, finish: float | None) -> RequestTiming:
    return RequestTiming(
        arrival_time=arrival, first_token_time=first, finish_time=finish,
        ttft_s=None if first is None else first - arrival,
        e2e_s=None if finish is None else finish - arrival,
    )


async def collect(receive: Receive, stream: RequestStream, stopping: asyncio.Event,
                  retry_after_s: int) -> list[Accumulated]:
    """Run a stream to completion and close it; a client that disconnects first cancels it
    (ClientDisconnected), a server that stops first makes it a 503, and an engine-side
    failure becomes a 500."""
    try:
        return await run_until_disconnect(receive, _accumulate(stream), stopping)
    except ServerStopping:
        raise service_unavailable(STOPPING_MESSAGE, "shutting_down", retry_after_s,
                                  "unavailable") from None
    finally:
        await stream.aclose()


async def _accumulate(stream: RequestStream) -> list[Accumulated]:
    results = [Accumulated() for _ in range(stream.num_choices)]
    async with stream:
        async for index, out in stream:
            results[index].add(out)
    note_usage(stream, results)
    failed = [r.error for r in results if r.error]
    if failed:
        raise APIError(500, f"the request failed in the engine: {failed[0]}", "server_error",
                       code="engine_error")
    return results


def stream_response(stream: RequestStream, events: AsyncIterator[str],
                    stopping: asyncio.Event) -> SSEResponse:
    """An SSE response of `events`; closing it early (a disconnect) aborts the request, which
    the engine counts (finished_reason="abort")."""
    async def on_close(disconnected: bool) -> None:
        await stream.aclose()

    return SSEResponse(events, on_close, stopping)


def engine_error_event(message: str) -> str:
    """The SSE event that ends a stream whose request failed inside the engine."""
    return error_event(f"the request failed in the engine: {message}", "server_error",
                       "engine_error")


async def delta_events(
    stream: RequestStream, results: list[Accumulated],
    chunk: Callable[[int, RequestOutput, int], BaseModel],
) -> AsyncIterator[str]:
    """One event per output: `chunk(index, output, text offset before it)`, or an error
    event; outputs are merged into `results` on the way. A token whose text is held back (an
    incomplete character, a possible stop string) still gets its chunk, with empty text, so
    that a client counts one chunk per token and times the first token as it comes."""
    async for index, out in stream:
        acc = results[index]
        offset = len(acc.text)
        acc.add(out)
        if out.error:
            yield engine_error_event(out.error)
        elif out.new_token_ids or out.new_text or out.finished or out.new_logprobs:
            yield sse_event(chunk(index, out, offset))
    note_usage(stream, results)


def note_usage(stream: RequestStream, results: list[Accumulated]) -> None:
    """The request's token counts, for its access-log line."""
    usage = usage_of(results, getattr(stream.group, "n", 1) or 1)
    note_tokens(usage.prompt_tokens, usage.completion_tokens)


def usage_of(results: list[Accumulated], n: int = 1) -> Usage:
    """Prompt tokens once per prompt (its n choices share it), completion tokens of all."""
    prompt = sum(r.num_prompt_tokens for i, r in enumerate(results) if i % n == 0)
    completion = sum(r.num_output_tokens for r in results)
    cached = sum(r.num_cached_tokens for i, r in enumerate(results) if i % n == 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached})


def token_text(core: EngineCore, token_id: int) -> str:
    return core.tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(core: EngineCore, lps: list[TokenLogprob], start_offset: int = 0,
                        with_top: bool = True) -> CompletionLogprobs:
    out = CompletionLogprobs(top_logprobs=[] if with_top else None)
    offset = start_offset
    for lp in lps:
        text = token_text(core, lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.text_offset.append(offset)
        offset += len(text)
        if out.top_logprobs is not None:
            out.top_logprobs.append({token_text(core, t): v for t, v in lp.top})
    return out


def chat_logprobs(core: EngineCore, lps: list[TokenLogprob], top_n: int) -> ChatLogprobs:
    content = []
    for lp in lps:
        text = token_text(core, lp.token_id)
        top = [TopLogprob(token=(s := token_text(core, t)), logprob=v, bytes=list(s.encode()))
               for t, v in lp.top[:top_n]]
        content.append(ChatTokenLogprob(token=text, logprob=lp.logprob,
                                        bytes=list(text.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)


def with_prompt_logprobs(core: EngineCore, prompt: list[int],
                         prompt_lps: list[TokenLogprob | None] | None,
                         generated: CompletionLogprobs) -> CompletionLogprobs:
    """echo with logprobs: the prompt's tokens first (the first has no logprob), as vLLM."""
    out = CompletionLogprobs(top_logprobs=[] if generated.top_logprobs is not None else None)
    offset = 0
    entries = prompt_lps or [None] * len(prompt)
    for token_id, lp in zip(prompt, entries, strict=False):
        text = token_text(core, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.text_offset.append(offset)
        offset += len(text)
        if out.top_logprobs is not None:
            out.top_logprobs.append(None if lp is None else
                                    {token_text(core, t): v for t, v in lp.top})
    out.tokens += generated.tokens
    out.token_logprobs += generated.token_logprobs
    out.text_offset += generated.text_offset
    if out.top_logprobs is not None and generated.top_logprobs is not None:
        out.top_logprobs += generated.top_logprobs
    return out
