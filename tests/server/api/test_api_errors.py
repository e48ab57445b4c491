"""Issue 4 d: bad inputs get the right status and OpenAI-style error; the server keeps serving.

The module's server requires an API key, limits bodies to 4 KiB and the context to 64
tokens, so "cannot fit" and "too large" are cheap to provoke.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

import httpx
import pytest

from server.api.endpoint import ServerSettings
from server.engine import EngineConfig
from tests.server.conftest import InProcessServer, inprocess_server

API_KEY = "sk-test-" + "".join(random.choices("abcdef0123456789", k=12))
MAX_MODEL_LEN = 64
BODY_LIMIT = 4096
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=2048,
                          max_model_len=MAX_MODEL_LEN)
    settings = ServerSettings(api_key=API_KEY, max_request_bytes=BODY_LIMIT)
    with inprocess_server(config, settings) as s:
        yield s


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


# (id, method, path, raw body or None, headers override or None, status, error type, param)
INVALID = "invalid_request_error"
BAD_INPUTS = [
    ("truncated-json", "POST", COMPLETIONS, b'{"prompt": ', None, 400, INVALID, None),
    ("not-utf8", "POST", COMPLETIONS, b"\xff\xfe{}", None, 400, INVALID, None),
    ("array-body", "POST", COMPLETIONS, b"[1, 2]", None, 400, INVALID, None),
    ("missing-prompt", "POST", COMPLETIONS, _json({"max_tokens": 2}), None, 400, INVALID,
     "prompt"),
    ("prompt-wrong-type", "POST", COMPLETIONS, _json({"prompt": 42}), None, 400, INVALID,
     "prompt"),
    ("empty-prompt-list", "POST", COMPLETIONS, _json({"prompt": []}), None, 400, INVALID,
     "prompt"),
    ("max-tokens-string", "POST", COMPLETIONS, _json({"prompt": "a", "max_tokens": "5"}), None,
     400, INVALID, "max_tokens"),
    ("max-tokens-zero", "POST", COMPLETIONS, _json({"prompt": "a", "max_tokens": 0}), None,
     400, INVALID, "max_tokens"),
    ("temperature-negative", "POST", COMPLETIONS, _json({"prompt": "a", "temperature": -1}),
     None, 400, INVALID, "temperature"),
    ("top-p-zero", "POST", COMPLETIONS, _json({"prompt": "a", "top_p": 0}), None, 400,
     INVALID, "top_p"),
    ("n-zero", "POST", COMPLETIONS, _json({"prompt": "a", "n": 0}), None, 400, INVALID, "n"),
    ("logprobs-too-many", "POST", COMPLETIONS, _json({"prompt": "a", "logprobs": 50}), None,
     400, INVALID, "logprobs"),
    ("stream-options-without-stream", "POST", COMPLETIONS,
     _json({"prompt": "a", "stream_options": {"include_usage": True}}), None, 400, INVALID,
     None),
    ("too-many-stop-strings", "POST", COMPLETIONS,
     _json({"prompt": "a", "stop": [str(i) for i in range(17)]}), None, 400, INVALID, "stop"),
    ("suffix-unsupported", "POST", COMPLETIONS, _json({"prompt": "a", "suffix": "b"}), None, 400,
     INVALID, "suffix"),
    ("prompt-cannot-fit", "POST", COMPLETIONS,
     _json({"prompt": list(range(100, 100 + MAX_MODEL_LEN)), "max_tokens": 1}), None, 400,
     INVALID, "max_tokens"),
    ("max-tokens-beyond-context", "POST", COMPLETIONS,
     _json({"prompt": "a", "max_tokens": MAX_MODEL_LEN * 10}), None, 400, INVALID, "max_tokens"),
    ("token-id-out-of-vocab", "POST", COMPLETIONS, _json({"prompt": [1, 10**7]}), None, 400,
     INVALID, "prompt"),
    ("negative-token-id", "POST", COMPLETIONS, _json({"prompt": [1, -5]}), None, 400, INVALID,
     "prompt"),
    ("chat-no-messages", "POST", CHAT, _json({"messages": []}), None, 400, INVALID, "messages"),
    ("chat-unknown-role", "POST", CHAT, _json({"messages": [{"role": "robot", "content": "x"}]}),
     None, 400, INVALID, "messages.0.role"),
    ("chat-top-logprobs-without-logprobs", "POST", CHAT,
     _json({"messages": USER_MSG, "top_logprobs": 2}), None, 400, INVALID, None),
    ("chat-prompt-cannot-fit", "POST", CHAT,
     _json({"messages": [{"role": "user", "content": "word " * 200}]}), None, 400, INVALID,
     "max_tokens"),
    ("generate-text-and-ids", "POST", "/generate", _json({"text": "a", "input_ids": [1]}), None,
     400, INVALID, None),
    ("generate-no-prompt", "POST", "/generate", _json({"sampling_params": {}}), None, 400,
     INVALID, None),
    ("unknown-model", "POST", COMPLETIONS, _json({"prompt": "a", "model": "gpt-9"}), None, 404,
     INVALID, "model"),
    ("unknown-route", "POST", "/v1/embeddings", _json({"input": "a"}), None, 404, INVALID, None),
    ("wrong-method", "GET", COMPLETIONS, None, None, 405, INVALID, None),
    ("body-too-large", "POST", COMPLETIONS, _json({"prompt": "x" * BODY_LIMIT}), None, 413,
     INVALID, None),
    ("missing-api-key", "POST", COMPLETIONS, _json({"prompt": "a"}), {}, 401,
     "authentication_error", None),
    ("wrong-api-key", "POST", COMPLETIONS, _json({"prompt": "a"}),
     {"Authorization": "Bearer sk-wrong"}, 401, "authentication_error", None),
]


def _failures_by_reason(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for m in re.finditer(r'^attnserve_request_failure_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$',
                         metrics_text, re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    return counts


@pytest.mark.parametrize(
    "method,path,body,headers,status,error_type,param",
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input(server: InProcessServer, method, path, body, headers, status, error_type,
                   param):
    sent_headers = server.headers if headers is None else headers
    r = httpx.request(method, f"{server.base_url}{path}", content=body,
                      headers={**sent_headers, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type and error["message"]
    assert error["param"] == param
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_server_still_serves_after_bad_inputs(server: InProcessServer):
    """Runs after the table: answers correctly, frees every page, counts the failures."""
    before = _failures_by_reason(httpx.get(f"{server.base_url}/metrics").text)
    for case in BAD_INPUTS[:3]:
        httpx.request(case[1], f"{server.base_url}{case[2]}", content=case[3],
                      headers=server.headers)
    after = _failures_by_reason(httpx.get(f"{server.base_url}/metrics").text)
    assert after.get("validation", 0) == before.get("validation", 0) + 3

    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    r1 = httpx.post(f"{server.base_url}{COMPLETIONS}", json=body, headers=server.headers,
                    timeout=60)
    r2 = httpx.post(f"{server.base_url}/generate",
                    json={"text": body["prompt"], "sampling_params": {
                        "max_tokens": 4, "temperature": 0, "ignore_eos": True}},
                    headers=server.headers, timeout=60)
    assert r1.status_code == 200 and r2.status_code == 200
    assert r1.json()["choices"][0]["text"] == r2.json()["text"]
    assert r1.json()["usage"]["completion_tokens"] == len(r2.json()["output_ids"]) == 4
    server.wait_idle()
    # /health, /metrics, /openapi.json and the worker description stay open without the key
    for path in ("/health", "/metrics", "/openapi.json", "/server_info", "/model_info",
                 "/get_server_info", "/get_model_info"):
        assert httpx.get(f"{server.base_url}{path}").status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    assert httpx.post(f"{server.base_url}/flush_cache").status_code == 401


def test_internal_error_fails_only_that_request(server: InProcessServer,
                                                monkeypatch: pytest.MonkeyPatch):
    """A step that raises inside the engine: that request gets 500, the next one works."""
    core = server.thread.ctx.engine.core
    real_launch = core.runner.launch  # both schedules launch every step through it
    calls = {"n": 0}

    def failing_once(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real_launch(step)

    monkeypatch.setattr(core.runner, "launch", failing_once)
    body = {"prompt": "Hello there", "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{server.base_url}{COMPLETIONS}", json=body, headers=server.headers,
                   timeout=60)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert "injected kernel failure" in r.json()["error"]["message"]
    r = httpx.post(f"{server.base_url}{COMPLETIONS}", json=body, headers=server.headers,
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    server.wait_idle()
