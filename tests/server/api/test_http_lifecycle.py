"""Issue 4 e: disconnects abort and free pages, a full queue gives 503, SIGTERM drains,
and a dead engine thread turns /health to 503."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scheduler.request import SamplingParams
from server.api.endpoint import ServerSettings
from server.engine import EngineConfig
from tests.server.conftest import (
    REPO_ROOT,
    InProcessServer,
    inprocess_server,
    running_server,
    wait_for,
)

LONG = {"prompt": "Tell me a very long story about", "max_tokens": 3000, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    # Two sequences at a time and one queued request at most: a third long request waits,
    # a fourth is refused.
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=8192, max_num_seqs=2)
    with inprocess_server(config, ServerSettings(max_queued_requests=1)) as s:
        yield s


def _abort_count(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^attnserve_request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.M))


class StreamReader:
    """Reads one SSE stream on a thread, so a test can hold several open at once."""

    def __init__(self, base_url: str, body: dict, path: str = "/v1/completions") -> None:
        self.client = httpx.Client(base_url=base_url, timeout=120)
        self.body = {**body, "stream": True}
        self.path = path
        self.events: list[str] = []
        self.status: int | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.client.stream("POST", self.path, json=self.body) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                    if self.stop.is_set():
                        return  # leaving the block closes the connection mid-stream
        except BaseException as e:  # surfaced by the test through .error
            self.error = e
        finally:
            self.client.close()

    def wait_events(self, n: int, timeout: float = 60.0) -> None:
        wait_for(lambda: len(self.events) >= n or self.error is not None
                 or not self.thread.is_alive(), timeout, what=f"{n} SSE events")
        assert self.error is None and len(self.events) >= n, (self.status, self.error,
                                                              self.events)

    def drop(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def finish_reason(self) -> str | None:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return chunks[-1]["choices"][0].get("finish_reason") if chunks else None


def test_dropped_stream_is_aborted_and_pages_freed(server: InProcessServer):
    aborts = _abort_count(server.base_url)
    reader = StreamReader(server.base_url, LONG)
    reader.wait_events(3)
    stats = server.stats()
    assert stats["engine"]["num_running"] == 1 and stats["engine"]["num_pages_in_use"] > 0
    core = server.thread.ctx.engine.core
    steps_before = core.step_count
    reader.drop()
    t0 = time.monotonic()
    server.wait_idle(timeout=10)
    elapsed = time.monotonic() - t0
    steps = core.step_count - steps_before
    print(f"dropped stream released its pages after {elapsed * 1000:.0f} ms, {steps} steps")
    # the step running when the client left, at most one more before the abort applies
    assert steps <= 2, steps
    assert "[DONE]" not in reader.events
    assert _abort_count(server.base_url) == aborts + 1


def test_non_streaming_client_timeout_aborts(server: InProcessServer):
    aborts = _abort_count(server.base_url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=LONG, timeout=1.5)
    server.wait_idle(timeout=10)
    assert _abort_count(server.base_url) == aborts + 1


def test_async_generate_stopped_early_aborts(server: InProcessServer):
    """AsyncEngine.generate: a consumer that stops after two outputs aborts the request."""
    engine = server.thread.ctx.engine
    prompt = engine.core.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=500, ignore_eos=True, temperature=0)

    async def take_two() -> list:
        outs = []
        async with contextlib.aclosing(engine.generate(prompt, params)) as outputs:
            async for out in outputs:
                outs.append(out)
                if len(outs) == 2:
                    break
        return outs

    outs = asyncio.run_coroutine_threadsafe(take_two(), engine.loop).result(60)
    assert [len(o.new_token_ids) for o in outs] == [1, 1] and not outs[-1].finished
    server.wait_idle(timeout=10)


def _thread_cpu_seconds(native_id: int) -> float:
    stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_engine_thread_sleeps(server: InProcessServer):
    """No busy-wait: an idle engine thread uses (almost) no CPU."""
    server.wait_idle()
    tid = server.thread.ctx.engine.thread_native_id
    before = _thread_cpu_seconds(tid)
    time.sleep(1.0)
    assert _thread_cpu_seconds(tid) - before <= 0.02


def test_full_queue_gives_503_with_retry_after(server: InProcessServer):
    # One at a time: a request counts as queued until its first token.
    running = []
    for _ in range(2):
        running.append(StreamReader(server.base_url, LONG))
        running[-1].wait_events(1)
    queued = StreamReader(server.base_url, LONG)  # max_num_seqs=2: it waits for a slot
    wait_for(lambda: server.stats()["num_queued_requests"] == 1, 30, what="a queued request")
    r = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 1})
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert r.json()["error"]["code"] == "queue_full"
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # full is not unhealthy
    # more prompts in one request than the queue can ever hold: a 400, not a retry
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    for reader in (*running, queued):
        reader.drop()
    server.wait_idle(timeout=15)
    r = httpx.post(f"{server.base_url}/v1/completions", json={**LONG, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_dead_engine_thread_makes_health_503():
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=1024)
    with inprocess_server(config) as s:
        core = s.thread.ctx.engine.core

        def crash() -> None:
            raise RuntimeError("simulated engine-loop crash")

        core.step = crash  # the loop itself fails (not a request's step)
        r = httpx.post(f"{s.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 500 and "engine thread crashed" in r.json()["error"]["message"]
        wait_for(lambda: not s.thread.ctx.engine.thread_alive, 10, what="the thread to exit")
        health = httpx.get(f"{s.base_url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "broken"
        r = httpx.post(f"{s.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503


def test_startup_then_sigterm_drains_then_exits_zero():
    # The short request needs one more token after its first; the timeout leaves room for a
    # slow, shared CPU, and the long one cannot finish within it.
    timeout_s = 10.0
    with running_server("--shutdown-timeout", str(timeout_s), "--kv-cache-tokens", "8192") as srv:
        # the socket is open before the model loads: /health said "starting" meanwhile
        assert (503, "starting") in srv.startup_health
        short = StreamReader(srv.base_url, {"prompt": "Count to ten:", "max_tokens": 2,
                                            "ignore_eos": True, "temperature": 0})
        long = StreamReader(srv.base_url, LONG)
        short.wait_events(1)
        long.wait_events(1)
        srv.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        wait_for(lambda: httpx.get(f"{srv.base_url}/health").status_code == 503, 5,
                 what="/health to report draining")
        assert httpx.get(f"{srv.base_url}/health").json()["error"]["code"] == "draining"
        refused = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and "retry-after" in refused.headers
        short.thread.join(60)
        long.thread.join(60)
        assert short.finish_reason() == "length" and short.events[-1] == "[DONE]"
        assert long.finish_reason() == "abort" and long.events[-1] == "[DONE]"
        assert srv.proc is not None
        assert srv.proc.wait(60) == 0, srv.log()[-3000:]
        elapsed = time.monotonic() - t_signal
        # waited for the timeout, then aborted the rest and left
        assert timeout_s - 0.5 <= elapsed < timeout_s + 30, elapsed
        assert "aborted 1 requests" in srv.log()


def test_model_that_cannot_load_exits_nonzero(tmp_path: Path):
    # A path that does not exist is refused before the server starts (exit 2, one line:
    # tests/server/engine/test_engine_flags.py); a file that fails while loading gets here.
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"not a gguf file")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--model", str(corrupt)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "engine failed to start" in proc.stderr and "attnserve listening on" in proc.stdout
