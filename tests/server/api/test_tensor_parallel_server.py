"""A real server (`attnserve serve`, its own process) split over two ranks on the CPU: its
metrics are exported once, labelled tp_size="2"; and killing the worker process of rank 1
fails it loudly within seconds: /health answers 503 `broken`, the requests in flight end
with an error (a streamed one with an error event, a plain one with a 500), and new ones get
503, rather than anything waiting on the dead rank."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.model.tiny_llama import write_tiny_llama
from tests.server.conftest import running_server, wait_for

FAIL_WITHIN_S = 5.0
PROMPT = [5 + (7 * j) % 900 for j in range(40)]  # token ids (the tiny model's vocabulary)


def _completion(max_tokens: int, stream: bool) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


def test_killing_a_rank_fails_the_server_loudly_within_seconds(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "tiny")
    with running_server("--model", str(folder), "--device", "cpu", "--dtype", "float32",
                        "--tensor-parallel-size", "2", "--kv-cache-tokens", "8192",
                        "--max-model-len", "4096", "--served-model-name", "tiny") as server:
        url = server.base_url
        # a request that completes, then the metrics: one set, labelled with the split
        done = httpx.post(f"{url}/v1/completions", json=_completion(8, False), timeout=60)
        assert done.status_code == 200, done.text
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finished = re.findall(r'^attnserve_request_success_total\{([^}]*)\} (\S+)$', metrics,
                              re.MULTILINE)
        assert finished and all('tp_size="2"' in labels for labels, _ in finished)
        assert sum(float(v) for _, v in finished) == 1.0  # counted once, not once per rank

        match = re.search(r"tensor-parallel rank 1: pid (\d+)", server.log())
        assert match, server.log()[-3000:]
        worker_pid = int(match.group(1))

        plain: dict[str, object] = {}

        def plain_request() -> None:
            r = httpx.post(f"{url}/v1/completions", json=_completion(3900, False), timeout=60)
            plain["status"], plain["body"], plain["at"] = r.status_code, r.json(), time.monotonic()

        with httpx.stream("POST", f"{url}/v1/completions", json=_completion(3900, True),
                          timeout=60) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert "choices" in first  # streaming: the request is running
            waiter = threading.Thread(target=plain_request)
            waiter.start()
            time.sleep(0.3)
            os.kill(worker_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            events = [json.loads(line[6:]) for line in lines
                      if line.startswith("data: ") and line != "data: [DONE]"]
            stream_ended_s = time.monotonic() - killed_at
        assert stream_ended_s < FAIL_WITHIN_S
        error = events[-1]["error"]
        assert error["code"] == "engine_error" and "rank 1" in error["message"], error

        waiter.join(FAIL_WITHIN_S + 5)
        assert not waiter.is_alive()
        assert plain["status"] == 500, plain
        assert plain["at"] - killed_at < FAIL_WITHIN_S  # type: ignore[operator]
        assert "rank 1" in plain["body"]["error"]["message"]  # type: ignore[index]

        def broken() -> bool:
            r = httpx.get(f"{url}/health", timeout=5)
            return r.status_code == 503 and r.json()["error"]["code"] == "broken"

        wait_for(broken, FAIL_WITHIN_S, what="/health to report the engine broken")
        refused = httpx.post(f"{url}/v1/completions", json=_completion(4, False), timeout=10)
        assert refused.status_code == 503, refused.text
        assert "tensor-parallel rank 1" in server.log()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_ranks_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    """No orphans: a worker whose rank 0 died (SIGKILL, no clean-up) exits by itself."""
    folder = write_tiny_llama(tmp_path / "tiny")
    with running_server("--model", str(folder), "--device", "cpu", "--dtype", "float32",
                        "--tensor-parallel-size", "2", "--kv-cache-tokens", "2048",
                        "--max-model-len", "1024") as server:
        pids = [int(p) for p in re.findall(r"tensor-parallel rank \d: pid (\d+)", server.log())]
        assert len(pids) == 1 and all(_running(p) for p in pids)
        server.send_signal(signal.SIGKILL)
        assert server.proc is not None
        server.proc.wait(10)
        wait_for(lambda: not any(_running(p) for p in pids), FAIL_WITHIN_S,
                 what="the workers of a killed server to exit")
