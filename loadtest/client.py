"""One streamed request, timed: TTFT, inter-token latencies and end-to-end latency.

The definitions are vLLM's benchmark's: a request's clock starts when it is handed to the
HTTP client; TTFT is the arrival of the first event that carries a token; each ITL is the
gap between two consecutive such events; the end-to-end latency ends at the last of them
(not at the usage event or ``[DONE]`` that follow it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.protocols import ENDPOINT_PATHS, StreamParser

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
    latency: float = 0.0  # end to end: until the last token's event arrived
    start_time: float = 0.0  # time.perf_counter() when the clock started (vLLM's start_time)
    send_offset: float = 0.0  # when it was sent, seconds after the run started
    generated_text: str = ""
    conversation_id: int = 0
    turn_index: int = 0


class StreamRecorder:
    """Turns one response's SSE lines, each with its arrival time, into a RequestResult.

    ``feed`` takes every line as it arrives (``perf_counter`` time); ``finish`` gives the
    result. The same code times live requests and replays recorded streams.
    """

    def __init__(self, endpoint: str, start: float, expected_prompt_len: int = 0) -> None:
        self.parser = StreamParser(endpoint)
        self.result = RequestResult(expected_prompt_len=expected_prompt_len,
                                    prompt_len=expected_prompt_len, start_time=start)
        self.token_events = 0
        self.last_token_at = start
        self.text_parts: list[str] = []
        self.usage_prompt: int | None = None
        self.usage_completion: int | None = None
        self.counted_tokens = 0
        self.saw_counts = False

    def feed(self, line: str, now: float) -> bool:
        """Read one line; False once the stream reported an error (stop reading)."""
        if not line.startswith("data:"):
            return True  # blank separators, comments (": ping"), event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            return True
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError(f"a stream chunk is not a JSON object: {payload[:200]}")
        info = self.parser.parse(data)
        if info.error:
            self.result.error = info.error
            return False
        if info.carries_token:
            if self.token_events == 0:
                self.result.ttft = now - self.result.start_time
            else:
                self.result.itl.append(now - self.last_token_at)
            self.last_token_at = now
            self.token_events += 1
        self.text_parts.append(info.text)
        if info.num_tokens is not None:
            self.saw_counts = True
            self.counted_tokens += info.num_tokens
        if info.prompt_tokens is not None:
            self.usage_prompt = info.prompt_tokens
        if info.completion_tokens is not None:
            self.usage_completion = info.completion_tokens
        return True

    def finish(self) -> RequestResult:
        result = self.result
        if result.error:
            return result
        if self.token_events == 0:
            result.error = "the stream ended without any token"
            return result
        result.success = True
        result.latency = self.last_token_at - result.start_time
        result.generated_text = "".join(self.text_parts)
        if self.usage_prompt is not None:
            result.prompt_len = self.usage_prompt
        if self.usage_completion is not None:
            result.output_tokens, result.output_tokens_source = self.usage_completion, "usage"
        elif self.saw_counts:
            result.output_tokens, result.output_tokens_source = self.counted_tokens, "token_ids"
        else:
            result.output_tokens, result.output_tokens_source = self.token_events, "chunks"
        return result


async def send_streaming_request(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], expected_prompt_len: int
) -> RequestResult:
    """POST ``body`` with streaming on and time every event as it arrives."""
    payload_bytes = json.dumps(body).encode()  # encoded before the clock starts
    start = time.perf_counter()
    recorder = StreamRecorder(endpoint, start, expected_prompt_len)
    try:
        async with client.stream("POST", ENDPOINT_PATHS[endpoint], content=payload_bytes,
                                 headers=_JSON_HEADERS) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")
                recorder.result.error = f"HTTP {response.status_code}: {detail[:500]}"
                return recorder.result
            # Read on to the end of the body (past [DONE]) so the connection can be reused.
            async for line in response.aiter_lines():
                if not recorder.feed(line, time.perf_counter()):
                    break
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        # Transport errors and malformed streams are the request's failure, not the run's.
        recorder.result.error = f"{type(exc).__name__}: {exc}"
        return recorder.result
    return recorder.finish()
