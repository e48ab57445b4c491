"""A tiny HTTP/1.1 server that streams SSE chunks at scripted times (tests only).

It speaks enough of the OpenAI completions/chat protocol and of attnserve's /generate to
drive the load generator, and keeps Prometheus-style counters on /metrics. Each streamed
request gets the script of ``ScriptedSSEServer.script``: the first content chunk ``ttft_s``
after the request arrived, then one chunk per gap in ``gaps_s``. Run it in a thread
(``ScriptedSSEServer``) or as a process (``python -m tests.loadtest.scripted_server``, the
stand-in server of the sweep test, with --host/--port and ignored extra flags).

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


@dataclass
class Script:
    ttft_s: float = 0.05
    gaps_s: list[float] = field(default_factory=lambda: [0.02] * 4)
    fail_every: int = 0  # every Nth request answers HTTP 500 (0: never)
    follow_max_tokens: bool = False  # emit max_tokens chunks at gaps_s[0] instead
    # "normal"; "garbage": a non-JSON data line after the first chunk; "error_event": an
    # {"error": ...} event after the first chunk; "empty": [DONE] with no content at all.
    mode: str = "normal"
    # phase -> (steps per request, ms per step, attention ms per step); phases not named
    # are exported with zero steps, as attnserve creates every phase at start-up.
    step_split: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def chunk_times(self, max_tokens: int) -> list[float]:
        gaps = [self.gaps_s[0]] * (max_tokens - 1) if self.follow_max_tokens else self.gaps_s
        times = [self.ttft_s]
        for gap in gaps:
            times.append(times[-1] + gap)
        return times


@dataclass
class _Counters:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    steps: dict[str, list[float]] = field(default_factory=dict)  # phase -> [n, step s, attn s]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    # Per streamed request: perf_counter at arrival, at each content chunk's write, and at
    # the end of the stream (the [DONE] event, or the final chunk of /generate).
    timelines: list[list[float]] = field(default_factory=list)


def _prompt_len(path: str, body: dict[str, Any]) -> int:
    if path == "/generate":
        if "input_ids" in body:
            return len(body["input_ids"])
        return len(body.get("text", "").split())
    if path == "/v1/chat/completions":
        return sum(len(m["content"].split()) for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


class ScriptedSSEServer:
    def __init__(self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0,
                 label_layout: str = "nhd") -> None:
        self.script = script or Script()
        self.host, self.port = host, port
        self.label_layout = label_layout
        self.counters = _Counters()
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
                await self._route(method, path, raw, arrived, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # client gone or server shutting down: end this connection quietly
        finally:
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes,
                    content_type: str = "application/json") -> None:
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _route(self, method: str, path: str, raw: bytes, arrived: float,
                     writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/health":
            await self._send(writer, 200, b"{}")
        elif method == "GET" and path == "/v1/models":
            await self._send(writer, 200, json.dumps(
                {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]}
            ).encode())
        elif method == "GET" and path == "/metrics":
            await self._send(writer, 200, self._metrics_text().encode(), "text/plain")
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions",
                                           "/generate"):
            await self._stream(path, json.loads(raw), arrived, writer)
        else:
            await self._send(writer, 404, b'{"error": "not found"}')

    # ---- the scripted stream ------------------------------------------------------------
    async def _stream(self, path: str, body: dict[str, Any], arrived: float,
                      writer: asyncio.StreamWriter) -> None:
        c = self.counters
        c.requests += 1
        c.bodies.append(body)
        if self.script.fail_every and c.requests % self.script.fail_every == 0:
            await self._send(writer, 500, b'{"error": {"message": "scripted failure"}}')
            return
        timeline = [arrived]
        c.timelines.append(timeline)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        max_tokens = body.get("max_tokens") or body.get("sampling_params", {}).get(
            "max_tokens", 16)
        times = self.script.chunk_times(int(max_tokens))
        prompt_len = _prompt_len(path, body)
        if self.script.mode == "empty":
            await self._chunk(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if path == "/v1/chat/completions":  # a role-only chunk at once: not content
            await self._chunk(writer, json.dumps(
                {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        for i, at in enumerate(times):
            await asyncio.sleep(max(0.0, arrived + at - time.perf_counter()))
            last = i == len(times) - 1
            finish = "length" if last else None
            word = f" w{i}"
            if path == "/v1/completions":
                payload = {"choices": [{"index": 0, "text": word, "finish_reason": finish}]}
            elif path == "/v1/chat/completions":
                payload = {"choices": [{"index": 0, "delta": {"content": word},
                                        "finish_reason": finish}]}
            else:
                payload = {"text": word, "token_ids": [100 + i], "finished": last,
                           "finish_reason": finish, "completion_tokens": i + 1}
            text = json.dumps(payload)
            timeline.append(time.perf_counter())
            if i == 0:
                c.ttft_sum += timeline[-1] - arrived
                c.ttft_count += 1
            await self._chunk(writer, text)
            if i == 0 and self.script.mode == "garbage":
                await self._chunk(writer, "this is not json")
            if i == 0 and self.script.mode == "error_event":
                await self._chunk(writer, json.dumps({"error": {"message": "engine died"}}))
        if path != "/generate":
            await self._chunk(writer, json.dumps({"choices": [], "usage": {
                "prompt_tokens": prompt_len, "completion_tokens": len(times),
                "total_tokens": prompt_len + len(times)}}))
        # Counted before [DONE]: a client that scrapes /metrics next sees them.
        c.prompt_tokens += prompt_len
        c.generation_tokens += len(times)
        for phase, (n, step_ms, attention_ms) in self.script.step_split.items():
            totals = c.steps.setdefault(phase, [0, 0.0, 0.0])
            totals[0] += n
            totals[1] += n * step_ms / 1000
            totals[2] += n * attention_ms / 1000
        timeline.append(time.perf_counter())
        await self._chunk(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

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
                    follow_max_tokens=True, step_split=split)
    server = ScriptedSSEServer(script, args.host, args.port, label_layout=args.kv_layout)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
