"""What SGLang's router needs of a worker (docs/replicas.md), on one in-process server:
the bodies it forwards (recorded from sglang-router 0.3.2, which re-serialises every request
with its own defaults) are served as the client's own; those fields with any other value
are a 400 naming them; /server_info and /model_info (and the older get_ names) describe the
engine; /flush_cache empties the prefix cache; --leave-pool-delay fails /health while
requests are still served, then drains.
"""

from __future__ import annotations

import time

import httpx
import pytest

from server.api.endpoint import ServerSettings
from server.engine import EngineConfig
from tests.server.conftest import InProcessServer, inprocess_server, wait_for

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
# As the router forwards them: the client's fields, then the router's defaults.
ROUTER_COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0,
                     "stream": False, "echo": False, "no_stop_trim": False,
                     "ignore_eos": False, "skip_special_tokens": True,
                     "return_hidden_states": False}
ROUTER_CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "model": MODEL,
               "logprobs": False, "max_completion_tokens": 4, "temperature": 0.0,
               "stream": False, "no_stop_trim": False, "ignore_eos": False,
               "continue_final_message": False, "skip_special_tokens": True,
               "separate_reasoning": True, "stream_reasoning": True,
               "return_hidden_states": False}
ROUTER_GENERATE = {"text": PROMPT, "model": None,
                   "sampling_params": {"max_new_tokens": 4, "temperature": 0.0},
                   "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
                   "return_hidden_states": False, "background": False, "no_logs": False,
                   "return_bytes": False, "return_entropy": False}
ROUTER_ONLY = {"/v1/completions": ("no_stop_trim", "skip_special_tokens",
                                   "return_hidden_states"),
               "/v1/chat/completions": ("no_stop_trim", "skip_special_tokens",
                                        "return_hidden_states", "continue_final_message",
                                        "separate_reasoning", "stream_reasoning"),
               "/generate": ("model", "return_text_in_logprobs", "log_metrics",
                             "return_hidden_states", "background", "no_logs", "return_bytes",
                             "return_entropy")}
BODIES = {"/v1/completions": ROUTER_COMPLETION, "/v1/chat/completions": ROUTER_CHAT,
          "/generate": ROUTER_GENERATE}


def post(server: InProcessServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120)


def text_of(path: str, data: dict) -> str:
    if path == "/v1/chat/completions":
        return data["choices"][0]["message"]["content"]
    return data["choices"][0]["text"] if path == "/v1/completions" else data["text"]


@pytest.mark.parametrize("path", list(BODIES))
def test_router_forwarded_bodies_answer_as_the_clients_own(shared_server: InProcessServer,
                                                           path: str) -> None:
    routed = post(shared_server, path, BODIES[path])
    assert routed.status_code == 200, routed.text
    plain_body = {k: v for k, v in BODIES[path].items() if k not in ROUTER_ONLY[path]}
    plain = post(shared_server, path, plain_body)
    assert plain.status_code == 200, plain.text
    assert text_of(path, routed.json()) == text_of(path, plain.json())


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "no_stop_trim", True),
    ("/v1/completions", "skip_special_tokens", False),
    ("/v1/completions", "return_hidden_states", True),
    ("/v1/chat/completions", "continue_final_message", True),
    ("/v1/chat/completions", "skip_special_tokens", False),
    ("/generate", "return_bytes", True),
    ("/generate", "log_metrics", False),
    ("/generate", "background", True),
])
def test_router_fields_that_ask_for_something_else_are_a_400(
        shared_server: InProcessServer, path: str, field: str, value: object) -> None:
    r = post(shared_server, path, {**BODIES[path], field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_generate_checks_the_model_name(shared_server: InProcessServer) -> None:
    r = post(shared_server, "/generate", {**ROUTER_GENERATE, "model": "other-model"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(shared_server, "/generate", {**ROUTER_GENERATE, "model": MODEL}).status_code == 200


def test_server_and_model_info(shared_server: InProcessServer) -> None:
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
        r = httpx.get(shared_server.base_url + path, timeout=30)
        assert r.status_code == 200, (path, r.text)
        info = r.json()
        assert info["served_model_name"] == MODEL
        assert info["is_generation"] is True
        assert info["max_context_length"] > 0 and info["vocab_size"] == 49152
        # No path the router would try to load a tokenizer from (or download).
        assert info["model_path"] is None and info["tokenizer_path"] is None
    info = httpx.get(shared_server.base_url + "/server_info", timeout=30).json()
    assert info["dp_size"] == 1 and info["page_size"] == 16
    assert info["max_total_num_tokens"] == 4096 and info["replica_name"] is None
    core = shared_server.thread.ctx.engine.core
    assert info["engine_config"]["attention_backend"] == core.backend.name


def test_flush_cache_empties_the_prefix_cache(shared_server: InProcessServer) -> None:
    long_prompt = "Tell me about rivers and stones. " * 12
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 1}
    assert post(shared_server, "/v1/completions", body).status_code == 200
    r = post(shared_server, "/flush_cache", {})
    assert r.status_code == 200 and r.json()["success"] is True
    assert r.json()["evicted_pages"] >= 5
    again = post(shared_server, "/v1/completions", body).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_replica_name_is_a_label_of_every_series_and_is_checked() -> None:
    with pytest.raises(ValueError, match="--replica-name"):
        ServerSettings(replica_name="has space")
    with pytest.raises(ValueError, match="--leave-pool-delay"):
        ServerSettings(leave_pool_delay=-1)
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=1024)
    with inprocess_server(config, ServerSettings(replica_name="replica-7")) as server:
        text = httpx.get(server.base_url + "/metrics", timeout=30).text
        series = [line for line in text.splitlines()
                  if line.startswith("attnserve_") and "{" in line]
        assert series and all('replica="replica-7"' in line for line in series)
        info = httpx.get(server.base_url + "/server_info", timeout=30).json()
        assert info["replica_name"] == "replica-7"


def test_leave_pool_delay_fails_health_while_requests_are_served() -> None:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=1024)
    with inprocess_server(config, ServerSettings(leave_pool_delay=3.0)) as server:
        assert server.thread is not None
        base = server.base_url
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        server.thread.drain()  # what SIGTERM does
        start = time.monotonic()

        def health() -> httpx.Response:
            return httpx.get(base + "/health", timeout=10)

        wait_for(lambda: health().status_code == 503, 2, 0.05, "/health to fail")
        assert health().json()["error"]["code"] == "draining"
        served = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT,
                                                  "max_tokens": 2})
        assert served.status_code == 200, served.text
        assert time.monotonic() - start < 3.0, "the request must land inside the delay"

        def stopped() -> bool:
            try:
                return post(server, "/v1/completions",
                            {"prompt": PROMPT, "max_tokens": 1}).status_code == 503
            except httpx.HTTPError:
                return True

        wait_for(stopped, 30, 0.1, "the drain after the delay")
        assert time.monotonic() - start >= 3.0
