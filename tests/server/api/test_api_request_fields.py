"""Issue 20: no request field is silently ignored. Every sampling field vLLM's OpenAI server
takes changes the outcome (or is accepted as documented); fields attnserve does not implement,
and unknown ones, are a 400 naming them. Also POST /reset_prefix_cache and /v1/models' fields.

One in-process server (real SmolLM2, CPU) serves the module; outputs are short.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import InProcessServer
from tests.server.engine_fixtures import smollm2

PROMPT = "The capital of France is"


def post(server: InProcessServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers, timeout=120)


def completion(server: InProcessServer, **fields) -> dict:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                         **fields})
    assert r.status_code == 200, r.text
    return r.json()


def sse(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    blocks = [b[len("data: "):] for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def token_id(server: InProcessServer, text: str) -> int:
    r = post(server, "/generate", {"text": text, "sampling_params": {"max_tokens": 1,
                                                                     "temperature": 0}})
    return r.json()["output_ids"][0]


def test_n_returns_n_choices_and_computes_the_prompt_once(shared_server: InProcessServer):
    before = shared_server.stats()["engine"]
    long_prompt = "Once upon a time in a quiet seaside town " * 6  # several KV pages
    out = completion(shared_server, prompt=long_prompt, n=3, temperature=1.0, seed=7,
                     max_tokens=3, ignore_eos=True)
    after = shared_server.stats()["engine"]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == 9
    single = completion(shared_server, prompt=long_prompt, max_tokens=1)["usage"]["prompt_tokens"]
    assert out["usage"]["prompt_tokens"] == single  # counted once per prompt
    # The samples after the first found the prompt's pages in the prefix cache.
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert hits > 0, (before, after)

    chat = post(shared_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 2,
        "temperature": 1.0, "seed": 3, "stream": True})
    indices = {c["choices"][0]["index"] for c in sse(chat)}
    assert indices == {0, 1}


def test_logit_bias_forces_a_token_and_checks_keys(shared_server: InProcessServer):
    forced = token_id(shared_server, "Zebra")
    out = completion(shared_server, logit_bias={str(forced): 100}, max_tokens=3,
                     ignore_eos=True)
    ids = post(shared_server, "/generate", {"text": PROMPT, "sampling_params": {
        "max_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 100}}}).json()
    assert ids["output_ids"] == [forced] * 3
    assert out["choices"][0]["text"] == ids["text"]
    for bad in ({"x": 1}, {"99999999": 1}):
        r = post(shared_server, "/v1/completions", {"prompt": PROMPT, "logit_bias": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_min_tokens_keeps_eos_away(shared_server: InProcessServer):
    # A +100 bias on EOS ends the request at its first token; min_tokens masks EOS until then.
    eos = min(smollm2().tokenizer.eos_token_ids)
    body = {"messages": [{"role": "user", "content": "Say yes."}], "temperature": 0,
            "max_tokens": 10, "logit_bias": {str(eos): 100}}
    plain = post(shared_server, "/v1/chat/completions", body).json()
    assert plain["choices"][0]["finish_reason"] == "stop", plain
    assert plain["usage"]["completion_tokens"] == 1
    longer = post(shared_server, "/v1/chat/completions", {**body, "min_tokens": 4}).json()
    assert longer["usage"]["completion_tokens"] == 5  # 4 held away from EOS, then EOS
    assert longer["choices"][0]["finish_reason"] == "stop"
    native = post(shared_server, "/generate", {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 10, "min_new_tokens": 3, "logit_bias": {str(eos): 100},
        "temperature": 0}}).json()
    assert native["meta_info"]["completion_tokens"] == 4, native
    assert native["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}


def test_penalties_and_stop_token_ids_change_the_output(shared_server: InProcessServer):
    base = completion(shared_server, max_tokens=12, ignore_eos=True)
    ids = post(shared_server, "/generate", {"text": PROMPT, "sampling_params": {
        "max_tokens": 12, "temperature": 0, "ignore_eos": True}}).json()["output_ids"]
    assert base["choices"][0]["text"]
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0),
                         ("repetition_penalty", 3.0)):
        other = completion(shared_server, max_tokens=12, ignore_eos=True, **{field: value})
        assert other["choices"][0]["text"] != base["choices"][0]["text"], field
    stopped = completion(shared_server, max_tokens=12, stop_token_ids=[ids[2]])
    assert stopped["usage"]["completion_tokens"] == 3
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(shared_server: InProcessServer):
    a = completion(shared_server, temperature=1.0, seed=11, max_tokens=6, n=2)
    b = completion(shared_server, temperature=1.0, seed=11, max_tokens=6, n=2)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]


def test_echo_and_best_of(shared_server: InProcessServer):
    plain = completion(shared_server)["choices"][0]["text"]
    echoed = completion(shared_server, echo=True, logprobs=1)["choices"][0]
    assert echoed["text"] == PROMPT + plain
    lp = echoed["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) > 4
    stream = sse(post(shared_server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in stream) == PROMPT + plain

    best = completion(shared_server, n=1, best_of=3, temperature=1.0, seed=5)
    assert len(best["choices"]) == 1
    r = post(shared_server, "/v1/completions", {"prompt": PROMPT, "best_of": 2,
                                                "stream": True, "temperature": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "auto"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "parallel_tool_calls", True),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "echo", True),
    ("/v1/completions", "suffix", "!"),
    ("/v1/completions", "made_up_field", 1),
    ("/generate", "made_up_field", 1),
])
def test_unsupported_fields_are_a_400_naming_them(shared_server: InProcessServer, path, field,
                                                  value):
    body = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path \
        else {"prompt": PROMPT} if path == "/v1/completions" else {"text": PROMPT}
    r = post(shared_server, path, {**body, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_response_format_text_is_accepted(shared_server: InProcessServer):
    r = post(shared_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text


def test_reset_prefix_cache(shared_server: InProcessServer):
    completion(shared_server, prompt=PROMPT * 20, max_tokens=1)
    shared_server.wait_idle()
    r = post(shared_server, "/reset_prefix_cache", {})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["success"] is True and out["evicted_pages"] > 0
    assert shared_server.stats()["engine"]["num_pages_cached"] == 0
    again = post(shared_server, "/reset_prefix_cache", {}).json()
    assert again == {"success": True, "evicted_pages": 0}


def test_models_carry_the_fields_vllm_clients_read(shared_server: InProcessServer):
    card = httpx.get(f"{shared_server.base_url}/v1/models", timeout=10).json()["data"][0]
    for key in ("id", "object", "created", "owned_by", "root", "max_model_len", "permission"):
        assert card[key] is not None, key
    assert "parent" in card and card["parent"] is None
    assert isinstance(card["permission"], list)
