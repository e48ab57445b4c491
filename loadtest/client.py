"""One streamed request, timed: TTFT, inter-chunk latencies and end-to-end latency."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.protocols import ENDPOINT_PATHS, parse_chunk

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass
class RequestResult:
    """Timings in seconds from the moment the request was handed to the HTTP client."""

    success: bool = False
    error: str = ""
    expected_prompt_len: int = 0
    prompt_len: int = 0  # the server's count when it reports usage, else the expected one
    output_tokens: int = 0
    output_tokens_source: str = "none"  # usage | token_ids | chunks
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # end to end: until the stream ended
    send_offset: float = 0.0  # when it was sent, seconds after the run started
    sent_at: float = 0.0  # time.perf_counter() when the TTFT/E2E clock started
    generated_text: str = ""
    conversation_id: int = 0
    turn_index: int = 0


async def send_streaming_request(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], expected_prompt_len: int
) -> RequestResult:
    """POST ``body`` with streaming on and time every content chunk as it arrives.

    TTFT is the first chunk with content (text or token ids), ITL the gaps between
    consecutive content chunks, E2E the end of the stream (``[DONE]``, else the last byte).
    """
    result = RequestResult(expected_prompt_len=expected_prompt_len, prompt_len=expected_prompt_len)
    text_parts: list[str] = []
    usage_prompt: int | None = None
    usage_completion: int | None = None
    id_tokens = 0
    saw_ids = False
    content_chunks = 0
    last_content = 0.0
    done_at = 0.0
    payload_bytes = json.dumps(body).encode()  # encoded before the clock starts
    start = result.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", ENDPOINT_PATHS[endpoint], content=payload_bytes,
                                 headers=_JSON_HEADERS) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {detail[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                payload = line[5:].strip()
                now = time.perf_counter()
                if payload == "[DONE]":
                    # Read on to the end of the body so the connection can be reused.
                    done_at = done_at or now
                    continue
                data = json.loads(payload)
                if not isinstance(data, dict):
                    raise ValueError(f"a stream chunk is not a JSON object: {payload[:200]}")
                info = parse_chunk(endpoint, data)
                if info.error:
                    result.error = info.error
                    return result
                if info.has_content:
                    if content_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last_content)
                    last_content = now
                    content_chunks += 1
                    text_parts.append(info.text)
                if info.num_tokens is not None:
                    saw_ids = True
                    id_tokens += info.num_tokens
                if info.prompt_tokens is not None:
                    usage_prompt = info.prompt_tokens
                if info.completion_tokens is not None:
                    usage_completion = info.completion_tokens
        end = done_at or time.perf_counter()
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # Transport errors and malformed streams are the request's failure, not the run's.
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if content_chunks == 0:
        result.error = "the stream ended without any content chunk"
        return result
    result.success = True
    result.latency = end - start
    result.generated_text = "".join(text_parts)
    if usage_prompt is not None:
        result.prompt_len = usage_prompt
    if usage_completion is not None:
        result.output_tokens, result.output_tokens_source = usage_completion, "usage"
    elif saw_ids:
        result.output_tokens, result.output_tokens_source = id_tokens, "token_ids"
    else:
        result.output_tokens, result.output_tokens_source = content_chunks, "chunks"
    return result
