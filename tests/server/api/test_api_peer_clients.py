"""Issue 20: peer clients work unchanged. A streamed completion sends one chunk per token
(held-back text included), SGLang's /generate form round-trips, the access log has one line
per request, and the official `openai` client drives completions, chat and models.

One in-process server (real SmolLM2, CPU) serves the module.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai

from tests.server.conftest import InProcessServer

PROMPT = "The capital of France is"


def sse(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    blocks = [b[len("data: "):] for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def test_stream_has_a_chunk_per_token_and_never_leaks_a_stop_string(
        shared_server: InProcessServer):
    url = f"{shared_server.base_url}/v1/completions"
    base = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = httpx.post(url, json=base, timeout=120).json()["choices"][0]["text"]
    words = full.split()
    stop = " ".join(words[2:4])  # a multi-token stop string: its first tokens are held back
    body = {**base, "stop": [stop], "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse(httpx.post(url, json=body, timeout=120))
    usage = chunks[-1]["usage"]
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == usage["completion_tokens"]
    assert any(c["choices"][0]["text"] == "" for c in token_chunks)  # held-back text
    text = "".join(c["choices"][0]["text"] for c in token_chunks)
    assert stop not in text and full.startswith(text)


def test_sglang_generate_round_trip(shared_server: InProcessServer):
    url = f"{shared_server.base_url}/generate"
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 5, "temperature": 0,
                                                "ignore_eos": True, "top_k": 1}}
    out = httpx.post(url, json=body, timeout=120).json()
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 5 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["id"] and "cached_tokens" in meta and out["text"]

    events = sse(httpx.post(url, json={**body, "stream": True}, timeout=120))
    assert len(events) == 5
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # cumulative
    assert texts[-1] == out["text"] and events[-1]["output_ids"] == out["output_ids"]
    assert [e["meta_info"]["completion_tokens"] for e in events] == [1, 2, 3, 4, 5]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert "".join(e["delta_text"] for e in events) == out["text"]


def test_access_log_line_per_request(shared_server: InProcessServer, caplog):
    with caplog.at_level(logging.INFO, logger="attnserve.access"):
        httpx.post(f"{shared_server.base_url}/v1/completions",
                   json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}, timeout=120)
        httpx.post(f"{shared_server.base_url}/v1/completions",
                   json={"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True, "stream": True},
                   timeout=120)
        httpx.get(f"{shared_server.base_url}/nope", timeout=10)
    # the previous test's streamed request may log its line (written once the stream has
    # ended) inside this window: only this test's paths count
    lines = [r.getMessage() for r in caplog.records if r.name == "attnserve.access"
             and (" /v1/completions " in r.getMessage() or " /nope " in r.getMessage())]
    assert len(lines) == 3, lines
    assert "POST /v1/completions 200 " in lines[0] and "completion_tokens=3" in lines[0]
    assert "ms prompt_tokens=" in lines[0]
    assert "completion_tokens=2" in lines[1]
    assert "GET /nope 404 " in lines[2] and "tokens" not in lines[2]


def test_openai_client(shared_server: InProcessServer):
    client = openai.OpenAI(base_url=f"{shared_server.base_url}/v1", api_key="unused")
    models = client.models.list()
    model = models.data[0].id
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, n=2,
                                    temperature=1.0, seed=1, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.text.startswith(PROMPT) for c in out.choices)
    assert out.usage.completion_tokens == 6
    forced = httpx.post(f"{shared_server.base_url}/generate", json={
        "text": "Zebra", "sampling_params": {"max_tokens": 1, "temperature": 0}},
        timeout=60).json()["output_ids"][0]
    biased = client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                       temperature=0, logit_bias={str(forced): 100})
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
    assert biased.choices[0].text != plain.choices[0].text
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None
    assert sum(1 for c in chunks if c.choices) == chunks[-1].usage.completion_tokens


def _vllm_bench_serve_like(base_url: str, prompt: str, output_len: int) -> dict:
    """What `vllm bench serve` (openai-completions backend) does, from its documentation:
    without --model it takes the first entry of GET /v1/models; it posts a streamed
    completion with ignore_eos and include_usage, counts every chunk that carries a choice
    as one token, and takes the output length from the usage chunk."""
    models = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    model = models[0]["id"]
    assert models[0]["root"] and "max_model_len" in models[0]
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, usage, text = 0, None, ""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"]:
                tokens += 1
                text += chunk["choices"][0]["text"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert usage is not None
    return {"chunks": tokens, "output_len": usage["completion_tokens"], "text": text}


def _sglang_bench_serving_like(base_url: str, prompt: str, output_len: int) -> dict:
    """What `sglang.bench_serving --backend sglang` does, from its documentation: POST
    /generate with `text` and `sampling_params` (max_new_tokens, ignore_eos), stream, each
    `data:` event carrying the whole text so far and meta_info; ends at `data: [DONE]`."""
    body = {"text": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": output_len, "ignore_eos": True,
                                "temperature": 0}}
    events, last = 0, None
    with httpx.stream("POST", f"{base_url}/generate", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            last = json.loads(line[len("data:"):].strip())
            events += 1
    assert last is not None
    return {"events": events, "text": last["text"],
            "output_len": last["meta_info"]["completion_tokens"]}


def test_fakes_of_the_peer_benchmark_clients_run_unchanged(shared_server: InProcessServer):
    vllm = _vllm_bench_serve_like(shared_server.base_url, PROMPT, 6)
    assert vllm["chunks"] == vllm["output_len"] == 6
    sglang = _sglang_bench_serving_like(shared_server.base_url, PROMPT, 6)
    assert sglang["events"] == sglang["output_len"] == 6
    assert sglang["text"] == vllm["text"]  # greedy: the same six tokens either way
