"""Issue 21, points 5 and 6: a second signal during the drain, and an empty --api-key.

Both need the real CLI in a subprocess (signals, exit status, start-up checks).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server.cli import build_parser
from tests.server.conftest import REPO_ROOT, running_server, wait_for

LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


class Client:
    """One request on a thread: a stream's SSE events, or a plain response."""

    def __init__(self, base_url: str, path: str, body: dict) -> None:
        self.events: list[str] = []
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(base_url + path, body),
                                       daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            if body.get("stream"):
                with httpx.stream("POST", url, json=body, timeout=120) as r:
                    self.response = r
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            self.events.append(line[len("data: "):])
            else:
                self.response = httpx.post(url, json=body, timeout=120)
        except BaseException as e:  # surfaced by the test
            self.error = e


def test_second_signal_ends_open_requests_and_exits_nonzero():
    """SIGTERM drains; a SIGINT during the drain (an impatient Ctrl+C; a second SIGTERM takes
    the same path) ends everything at once."""
    second = signal.SIGINT
    with running_server("--shutdown-timeout", "60", "--kv-cache-tokens", "8192") as srv:
        streams = [
            Client(srv.base_url, "/v1/completions",
                   {"prompt": "Tell me a long story about", "stream": True, **LONG}),
            Client(srv.base_url, "/v1/chat/completions",
                   {"messages": [{"role": "user", "content": "Tell me a story"}],
                    "stream": True, **LONG}),
        ]
        plain = Client(srv.base_url, "/generate",
                       {"text": "Once upon a time", "sampling_params": LONG})
        wait_for(lambda: all(s.events for s in streams)
                 and srv.stats()["num_active_requests"] == 3, 60, what="three running requests")
        srv.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{srv.base_url}/health").status_code == 503, 10,
                 what="/health to report draining")
        t0 = time.monotonic()
        srv.send_signal(second)
        assert srv.proc is not None
        status = srv.proc.wait(60)
        exit_s = time.monotonic() - t0
        for c in (*streams, plain):
            c.thread.join(30)
            assert c.error is None, c.error
        log = srv.log()
    print(f"second {second.name}: exited {status} after {exit_s:.2f} s")
    assert status == 128 + second, log[-3000:]
    assert exit_s < 15, exit_s
    for s in streams:
        assert s.events[-1] == "[DONE]", s.events[-3:]
        error = json.loads(s.events[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable_error"
        # the chunks before it are ordinary ones: the stream was cut, not corrupted
        assert all("choices" in json.loads(e) for e in s.events[:-2])
    assert plain.response is not None and plain.response.status_code == 503
    assert plain.response.headers["content-type"] == "application/json"
    assert plain.response.json()["error"]["code"] == "shutting_down"
    assert log.count(f"second {second.name}") == 1, log[-3000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.mark.parametrize("key", ["", "  "], ids=["empty", "blank"])
def test_empty_api_key_is_refused_at_start(key: str):
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0", "--api-key", key],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--api-key must not be empty" in proc.stderr
    assert "attnserve listening" not in proc.stdout  # refused before binding or loading


def test_help_explains_every_hardening_flag():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(subcommands.choices["serve"].format_help().split())
    for flag, default in [("--max-connections", "2048"), ("--header-timeout", "10.0"),
                          ("--body-timeout", "30.0"), ("--keep-alive-timeout", "5.0"),
                          ("--allowed-origins", "none"), ("--api-key", "no key")]:
        explained = text[text.rindex(flag):][:400]  # its entry, after the usage line
        assert f"default {default}" in explained or f"default: {default}" in explained, flag
