"""A tiny HTTP/1.1 server that streams SSE events at scripted times (tests only).

It speaks the streaming protocols the load generator must understand, each written from
its server's documented behaviour (``Script.flavor``):
- ``attnserve``: OpenAI completions/chat as attnserve streams them (the chat role rides on
  the first token's event; a token whose text is held back gets no event) and attnserve's
  native /generate (``sampling_params.max_tokens``; events with the new ``text``,
  ``token_ids`` and the running ``completion_tokens``);
- ``vllm``: vLLM's OpenAI server: one event per token, empty text included (special
  tokens), a role-only chat event (``content: ""``) just before the first token, the usage
  event (``choices: []``), ``[DONE]``; no /generate;
- ``sglang``: SGLang's /generate (``sampling_params.max_new_tokens``; every event carries
  the whole text so far and ``meta_info`` with running counts; ``[DONE]``).

Each streamed request gets the script: the first token ``ttft_s`` after the request
arrived, then one token per gap in ``gaps_s``; ``done_delay_s`` later the usage event and
``[DONE]``. It keeps Prometheus-style counters on /metrics, a prefix cache of the prompts
it has seen (``attnserve_prefix_cache_queries_total``/``_hits_total``, in prompt tokens)
that ``POST /reset_prefix_cache`` empties (404 with ``reset_endpoint=False``), and, with
``api_key``, answers 401 without ``Authorization: Bearer KEY`` (/health and /metrics are
open, as in attnserve). Run it in a thread (``ScriptedSSEServer``) or as a process
(``python -m tests.loadtest.scripted_server``, the stand-in server of the sweep tests, with
--host/--port and ignored extra flags).

With ``Script.step_split`` it also exports attnserve's step and attention histograms (sum
and count, by phase): each finished request adds, per phase, a scripted number of steps
of scripted step and attention milliseconds, so the expected split is known exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FLAVORS = ("attnserve", "vllm", "sglang")
OPEN_PATHS = ("/health", "/metrics")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            500: "Internal Server Error"}


@dataclass
class Script:
    ttft_s: float = 0.05
    gaps_s: list[float] = field(default_factory=lambda: [0.02] * 4)
    fail_every: int = 0  # every Nth request answers HTTP 500 (0: never)
    follow_max_tokens: bool = False  # emit max_tokens tokens at gaps_s[0] instead
    # "normal"; "garbage": a non-JSON data line after the first token; "error_event": an
    # {"error": ...} event after the first token; "empty": [DONE] with no token at all.
    mode: str = "normal"
    flavor: str = "attnserve"
    early_role: bool = False  # chat: a role-only event at once, before any token
    empty_text_tokens: tuple[int, ...] = ()  # tokens (by index) whose text is empty
    done_delay_s: float = 0.0  # from the last token to the usage event and [DONE]
    reset_endpoint: bool = True
    api_key: str | None = None
    # phase -> (steps per request, ms per step, attention ms per step); phases not named
    # are exported with zero steps, as attnserve creates every phase at start-up.
    step_split: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def token_times(self, max_tokens: int) -> list[float]:
        gaps = [self.gaps_s[0]] * (max_tokens - 1) if self.follow_max_tokens else self.gaps_s
        times = [self.ttft_s]
        for gap in gaps:
            times.append(times[-1] + gap)
        return times


@dataclass
class Timeline:
    """perf_counter times of one streamed request: arrival, each event that carries a token
    (as written), and the [DONE] event."""

    arrived: float
    token_events: list[float] = field(default_factory=list)
    done: float = 0.0


@dataclass
class _Counters:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    cache_queries: int = 0
    cache_hits: int = 0
    resets: int = 0
    steps: dict[str, list[float]] = field(default_factory=dict)  # phase -> [n, step s, attn s]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    timelines: list[Timeline] = field(default_factory=list)
    # (method, path, Authorization header or None) of every request
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)


def _prompt(path: str, body: dict[str, Any]) -> list[Any]:
    """The prompt as tokens: ids as sent, text as words."""
    if path == "/generate":
        return list(body["input_ids"]) if "input_ids" in body else body.get("text", "").split()
    if path == "/v1/chat/completions":
        return [w for m in body["messages"] for w in m["content"].split()]
    prompt = body["prompt"]
    return list(prompt) if isinstance(prompt, list) else prompt.split()


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ScriptedSSEServer:
    def __init__(self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0,
                 label_layout: str = "nhd") -> None:
        self.script = script or Script()
        if self.script.flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {self.script.flavor!r}")
        self.host, self.port = host, port
        self.label_layout = label_layout
        self.counters = _Counters()
        self.cached_prompts: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- HTTP plumbing ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                arrived = time.perf_counter()
                self.counters.seen.append((method, path, headers.get("authorization")))
                await self._route(method, path, headers, raw, arrived, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # client gone or server shutting down: end this connection quietly
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes,
                    content_type: str = "application/json") -> None:
        writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()

    @staticmethod
    async def _error(writer: asyncio.StreamWriter, status: int, message: str) -> None:
        await ScriptedSSEServer._send(writer, status,
                                      json.dumps({"error": {"message": message}}).encode())

    @staticmethod
    async def _event(writer: asyncio.StreamWriter, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _route(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                     arrived: float, writer: asyncio.StreamWriter) -> None:
        key = self.script.api_key
        if key is not None and path not in OPEN_PATHS \
                and headers.get("authorization") != f"Bearer {key}":
            await self._error(writer, 401, "invalid API key")
        elif method == "GET" and path == "/health":
            await self._send(writer, 200, b"{}")
        elif method == "GET" and path == "/v1/models":
            await self._send(writer, 200, json.dumps(
                {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]}
            ).encode())
        elif method == "GET" and path == "/metrics":
            await self._send(writer, 200, self._metrics_text().encode(), "text/plain")
        elif method == "POST" and path == "/reset_prefix_cache" and self.script.reset_endpoint:
            self.cached_prompts.clear()
            self.counters.resets += 1
            await self._send(writer, 200, b'{"success": true}')
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            await self._stream(path, json.loads(raw), arrived, writer)
        elif method == "POST" and path == "/generate" and self.script.flavor != "vllm":
            await self._stream(path, json.loads(raw), arrived, writer)
        else:
            await self._error(writer, 404, "not found")

    # ---- the scripted stream ------------------------------------------------------------
    def _bad_native_body(self, body: dict[str, Any]) -> str | None:
        params = body.get("sampling_params", {})
        if self.script.flavor == "sglang" and "max_tokens" in params:
            return "SamplingParams got an unexpected keyword argument 'max_tokens'"
        if self.script.flavor == "attnserve" and "max_new_tokens" in params:
            return "sampling_params.max_new_tokens: extra inputs are not permitted"
        return None

    def _look_up_prefix(self, prompt: list[Any]) -> None:
        """Count the prompt's tokens found in the cache (all but the last can hit), then cache it."""
        hit = max((_common_prefix(prompt, seen) for seen in self.cached_prompts), default=0)
        self.counters.cache_queries += len(prompt)
        self.counters.cache_hits += min(hit, max(0, len(prompt) - 1))
        self.cached_prompts.append(prompt)

    async def _stream(self, path: str, body: dict[str, Any], arrived: float,
                      writer: asyncio.StreamWriter) -> None:
        c, script = self.counters, self.script
        c.requests += 1
        c.bodies.append(body)
        if path == "/generate" and (problem := self._bad_native_body(body)):
            await self._error(writer, 400, problem)
            return
        if script.fail_every and c.requests % script.fail_every == 0:
            await self._error(writer, 500, "scripted failure")
            return
        timeline = Timeline(arrived)
        c.timelines.append(timeline)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        params = body.get("sampling_params", {})
        max_tokens = body.get("max_tokens") or params.get("max_tokens") \
            or params.get("max_new_tokens", 16)
        times = script.token_times(int(max_tokens))
        prompt = _prompt(path, body)
        self._look_up_prefix(prompt)
        if script.mode == "empty":
            await self._finish(writer, timeline)
            return
        chat = path == "/v1/chat/completions"
        if chat and script.early_role:
            await self._event(writer, self._chat_event({"role": "assistant", "content": ""}))
        text_so_far = ""
        for i, at in enumerate(times):
            await asyncio.sleep(max(0.0, arrived + at - time.perf_counter()))
            last = i == len(times) - 1
            word = "" if i in script.empty_text_tokens else f" w{i}"
            text_so_far += word
            events = self._token_events(path, i, word, text_so_far, last, len(prompt))
            if events and i == 0:
                c.ttft_sum += time.perf_counter() - arrived
                c.ttft_count += 1
            for event in events:
                if event is events[-1]:
                    timeline.token_events.append(time.perf_counter())
                await self._event(writer, event)
            if i == 0 and script.mode == "garbage":
                await self._event(writer, "this is not json")
            if i == 0 and script.mode == "error_event":
                await self._event(writer, json.dumps({"error": {"message": "engine died"}}))
        if script.done_delay_s:
            await asyncio.sleep(script.done_delay_s)
        if path != "/generate":
            await self._event(writer, json.dumps({
                "id": "cmpl-scripted", "object": "text_completion", "created": 0,
                "model": "scripted-model", "choices": [], "usage": {
                    "prompt_tokens": len(prompt), "completion_tokens": len(times),
                    "total_tokens": len(prompt) + len(times)}}))
        # Counted before [DONE]: a client that scrapes /metrics next sees them.
        c.prompt_tokens += len(prompt)
        c.generation_tokens += len(times)
        for phase, (n, step_ms, attention_ms) in script.step_split.items():
            totals = c.steps.setdefault(phase, [0, 0.0, 0.0])
            totals[0] += n
            totals[1] += n * step_ms / 1000
            totals[2] += n * attention_ms / 1000
        await self._finish(writer, timeline)

    async def _finish(self, writer: asyncio.StreamWriter, timeline: Timeline) -> None:
        timeline.done = time.perf_counter()
        await self._event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    def _chat_event(delta: dict[str, Any], finish: str | None = None) -> str:
        return json.dumps({"id": "chatcmpl-scripted", "object": "chat.completion.chunk",
                           "created": 0, "model": "scripted-model", "choices": [
                               {"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": finish}]})

    def _token_events(self, path: str, i: int, word: str, text_so_far: str, last: bool,
                      prompt_len: int) -> list[str]:
        """The events that deliver token ``i`` (none, one, or a role event and the token)."""
        flavor, finish = self.script.flavor, "length" if last else None
        if path == "/generate" and flavor == "sglang":
            return [json.dumps({"text": text_so_far, "index": 0, "meta_info": {
                "id": "scripted", "prompt_tokens": prompt_len, "completion_tokens": i + 1,
                "cached_tokens": 0,
                "finish_reason": {"type": "length", "length": i + 1} if last else None}})]
        if path == "/generate":
            return [json.dumps({"request_id": "gen-scripted", "text": word,
                                "token_ids": [100 + i], "finished": last,
                                "finish_reason": finish, "completion_tokens": i + 1})]
        if flavor == "attnserve" and not word and not last:
            return []  # attnserve holds back a token without text until text comes
        if path == "/v1/completions":
            return [json.dumps({"id": "cmpl-scripted", "object": "text_completion",
                                "created": 0, "model": "scripted-model", "choices": [
                                    {"index": 0, "text": word, "logprobs": None,
                                     "finish_reason": finish, "stop_reason": None}]})]
        events = []
        if i == 0 and flavor != "attnserve" and not self.script.early_role:
            events.append(self._chat_event({"role": "assistant", "content": ""}))
        delta = {"content": word}
        if i == 0 and flavor == "attnserve" and not self.script.early_role:
            delta = {"role": "assistant", "content": word}
        events.append(self._chat_event(delta, finish))
        return events

    def _metrics_text(self) -> str:
        c = self.counters
        labels = (f'model_name="scripted-model",attention_backend="scripted",'
                  f'kv_layout="{self.label_layout}",page_size="16",attention_variant="softmax"')
        lines = []
        if self.script.step_split:
            for metric, column in (("step_duration_seconds", 1),
                                   ("attention_duration_seconds", 2)):
                name = f"attnserve_{metric}"
                lines.append(f"# TYPE {name} histogram")
                for phase in ("prefill", "decode", "mixed"):
                    n, *seconds = c.steps.get(phase, [0, 0.0, 0.0])
                    with_phase = f'{labels},phase="{phase}"'
                    lines += [f'{name}_bucket{{{with_phase},le="+Inf"}} {n}',
                              f"{name}_count{{{with_phase}}} {n}",
                              f"{name}_sum{{{with_phase}}} {seconds[column - 1]}"]
        return "\n".join(lines + [
            "# TYPE attnserve_prompt_tokens counter",
            f"attnserve_prompt_tokens_total{{{labels}}} {c.prompt_tokens}",
            "# TYPE attnserve_generation_tokens counter",
            f"attnserve_generation_tokens_total{{{labels}}} {c.generation_tokens}",
            "# TYPE attnserve_prefix_cache_queries counter",
            f"attnserve_prefix_cache_queries_total{{{labels}}} {c.cache_queries}",
            "# TYPE attnserve_prefix_cache_hits counter",
            f"attnserve_prefix_cache_hits_total{{{labels}}} {c.cache_hits}",
            "# TYPE attnserve_time_to_first_token_seconds summary",
            f"attnserve_time_to_first_token_seconds_sum{{{labels}}} {c.ttft_sum}",
            f"attnserve_time_to_first_token_seconds_count{{{labels}}} {c.ttft_count}",
            "",
        ])

    # ---- lifecycle --------------------------------------------------------------------------
    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.serve())
        except asyncio.CancelledError:
            pass

    def __enter__(self) -> ScriptedSSEServer:
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted server did not start")
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description="scripted SSE server (a stand-in for sweeps)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--kv-layout", default="nhd")
    parser.add_argument("--flavor", choices=FLAVORS, default="attnserve")
    parser.add_argument("--no-reset-endpoint", action="store_true",
                        help="POST /reset_prefix_cache answers 404")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--step-split", action="append", default=[],
                        metavar="PHASE=STEPS:STEP_MS:ATTENTION_MS",
                        help="per finished request, STEPS steps of this phase (repeatable)")
    args, _unknown = parser.parse_known_args()
    split = {}
    for item in args.step_split:
        phase, _, numbers = item.partition("=")
        steps, step_ms, attention_ms = numbers.split(":")
        split[phase] = (int(steps), float(step_ms), float(attention_ms))
    script = Script(ttft_s=args.ttft_ms / 1000, gaps_s=[args.itl_ms / 1000],
                    follow_max_tokens=True, step_split=split, flavor=args.flavor,
                    reset_endpoint=not args.no_reset_endpoint, api_key=args.api_key)
    server = ScriptedSSEServer(script, args.host, args.port, label_layout=args.kv_layout)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
