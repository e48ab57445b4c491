"""Issue 4 a-c: completions, chat and /generate over real HTTP, against offline generate.

One in-process uvicorn server (real SmolLM2, CPU) serves the whole module; the offline
reference is `server.llm.LLM` on the same weights. Prompts are drawn fresh each run.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import openai
import pytest

from scheduler.request import SamplingParams
from tests.server.conftest import InProcessServer
from tests.server.engine_fixtures import make_llm

SUBJECTS = ["The old lighthouse", "My favourite recipe", "The history of Rome", "A quiet forest",
            "The rules of chess", "Our solar system", "The best way to learn", "A rainy morning"]
VERBS = ["is", "begins with", "reminds me of", "can be described as", "was once"]
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 plus 3?",
             "Say hello in Spanish.", "Who wrote Hamlet?", "What do bees make?"]
MAX_TOKENS = 8


def random_prompt(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}"


@pytest.fixture(scope="module")
def offline():
    return make_llm()


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(1 << 30)
    print(f"prompt seed {seed}")
    return random.Random(seed)


def greedy(offline, prompt, chat: bool = False, max_tokens: int = MAX_TOKENS):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return offline.generate([prompt], params, chat=chat)[0]


def sse_payloads(response: httpx.Response) -> list[str]:
    """The data fields of an SSE body, checking the framing on the way."""
    payloads = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payloads.append(block[len("data: "):])
    assert payloads and payloads[-1] == "[DONE]"
    return payloads


def test_completion_matches_offline_greedy(shared_server: InProcessServer, offline, rng):
    prompt = random_prompt(rng)
    ref = greedy(offline, prompt)
    url = f"{shared_server.base_url}/v1/completions"
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"] == ref.text
    assert out["choices"][0]["finish_reason"] == ref.finish_reason
    assert out["usage"]["completion_tokens"] == len(ref.token_ids)
    assert out["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert out["usage"]["total_tokens"] == len(ref.token_ids) + len(ref.prompt_token_ids)

    r = httpx.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(p) for p in sse_payloads(r)[:-1]]
    *token_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(
        ref.token_ids)
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == ref.text
    # one token per chunk: never more chunks than tokens, and each chunk is one token's text
    assert 1 <= len(token_chunks) <= len(ref.token_ids)
    assert [c["choices"][0].get("finish_reason") for c in token_chunks][-1] == ref.finish_reason
    assert all(c["choices"][0].get("finish_reason") is None for c in token_chunks[:-1])
    assert all(c["id"] == chunks[0]["id"] and c["object"] == "text_completion" for c in chunks)


def test_chat_matches_offline_greedy(shared_server: InProcessServer, offline, rng):
    question = rng.choice(QUESTIONS)
    ref = greedy(offline, question, chat=True)
    url = f"{shared_server.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": question}],
            "max_completion_tokens": MAX_TOKENS, "temperature": 0.0}
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert out["choices"][0]["finish_reason"] == ref.finish_reason
    assert out["usage"]["completion_tokens"] == len(ref.token_ids)

    r = httpx.post(url, json={**body, "stream": True}, timeout=120)
    chunks = [json.loads(p) for p in sse_payloads(r)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert deltas[0].get("role") == "assistant" and deltas[0].get("content")
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_prompt_forms_give_one_choice_per_prompt(shared_server: InProcessServer, offline, rng):
    prompts = [random_prompt(rng), random_prompt(rng)]
    refs = [greedy(offline, p) for p in prompts]
    url = f"{shared_server.base_url}/v1/completions"
    for form in (prompts, [r.prompt_token_ids for r in refs]):
        r = httpx.post(url, json={"prompt": form, "max_tokens": MAX_TOKENS, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1]
        assert [c["text"] for c in choices] == [ref.text for ref in refs]
    r = httpx.post(url, json={"prompt": refs[0].prompt_token_ids, "max_tokens": MAX_TOKENS,
                              "temperature": 0}, timeout=120)
    assert r.json()["choices"][0]["text"] == refs[0].text


def single_token_words(offline, token_ids: list[int], text: str) -> list[str]:
    """Words of `text` that are one whole token and first occur as that token."""
    words, offset = [], 0
    for t in token_ids:
        piece = offline.tokenizer.decode([t])
        word = piece.strip()
        start = offset + len(piece) - len(piece.lstrip())
        if len(word) >= 3 and start > 0 and text.find(word) == start:
            words.append(word)
        offset += len(piece)
    return words


def test_multi_token_stop_string_is_not_leaked(shared_server: InProcessServer, offline):
    prompt = "The old lighthouse is"
    ref = greedy(offline, prompt, max_tokens=12)
    pieces = [offline.tokenizer.decode([t]) for t in ref.token_ids]
    stop = (pieces[1] + pieces[2]).strip()  # spans two tokens
    out = httpx.post(f"{shared_server.base_url}/v1/completions",
                     json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": stop},
                     timeout=120).json()
    assert out["choices"][0]["text"] == ref.text[: ref.text.find(stop)]


def test_stop_string_and_seeded_sampling(shared_server: InProcessServer, offline, rng):
    prompt = random_prompt(rng)
    ref = greedy(offline, prompt, max_tokens=12)
    url = f"{shared_server.base_url}/v1/completions"
    words = single_token_words(offline, ref.token_ids, ref.text)
    if words:  # stop at a word from the middle of the greedy text: the text ends before it
        stop = rng.choice(words)
        out = httpx.post(url, json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                    "stop": [stop]}, timeout=120).json()
        assert out["choices"][0]["text"] == ref.text[: ref.text.find(stop)]
        assert out["choices"][0]["finish_reason"] == "stop"

    def sample(seed: int) -> list[int]:
        body = {"text": prompt, "sampling_params": {
            "max_tokens": MAX_TOKENS, "temperature": 1.0, "top_k": 50, "top_p": 0.95,
            "min_p": 0.01, "seed": seed, "ignore_eos": True}}
        return httpx.post(f"{shared_server.base_url}/generate", json=body,
                          timeout=120).json()["output_ids"]

    seed = rng.randrange(1 << 31)
    first = sample(seed)
    assert sample(seed) == first  # same seed, same tokens
    assert any(sample(seed + k) != first for k in range(1, 4))  # other seeds differ


def test_native_generate_returns_ids_and_timing(shared_server: InProcessServer, offline, rng):
    prompt = random_prompt(rng)
    ref = greedy(offline, prompt)
    url = f"{shared_server.base_url}/generate"
    body = {"text": prompt, "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0}}
    out = httpx.post(url, json=body, timeout=120).json()
    assert out["output_ids"] == ref.token_ids and out["text"] == ref.text
    t = out["timing"]
    assert t["arrival_time"] <= t["first_token_time"] <= t["finish_time"]
    assert math.isclose(t["ttft_s"], t["first_token_time"] - t["arrival_time"], abs_tol=1e-6)
    assert out["prompt_tokens"] == len(ref.prompt_token_ids)

    by_ids = {"input_ids": ref.prompt_token_ids, "stream": True,
              "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0}}
    chunks = [json.loads(p) for p in sse_payloads(httpx.post(url, json=by_ids, timeout=120))[:-1]]
    assert [t for c in chunks for t in c["token_ids"]] == ref.token_ids
    assert all(len(c["token_ids"]) == 1 for c in chunks)  # one token per chunk
    assert chunks[-1]["finished"] and chunks[-1]["timing"]["finish_time"] is not None


def test_logprobs(shared_server: InProcessServer, rng):
    base = shared_server.base_url
    body = {"prompt": random_prompt(rng), "max_tokens": 4, "temperature": 0, "logprobs": 3}
    out = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
    lp = out["choices"][0]["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-4)  # greedy = most likely

    chat = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "stream": True}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120)
    entries = [e for p in sse_payloads(r)[:-1]
               for e in (json.loads(p)["choices"][0].get("logprobs") or {}).get("content", [])]
    assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["logprob"] <= 0 and bytes(e["bytes"]).decode(errors="replace") == e["token"]
               for e in entries)


async def _one_stream(client: httpx.AsyncClient, prompt: str) -> list[dict]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 7,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        text = (await r.aread()).decode()
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def test_sixteen_concurrent_streams(shared_server: InProcessServer, rng):
    prompts = [random_prompt(rng) for _ in range(16)]

    async def run_all() -> list[list[dict]]:
        async with httpx.AsyncClient(base_url=shared_server.base_url, timeout=300) as client:
            return await asyncio.gather(*(_one_stream(client, p) for p in prompts))

    streams = asyncio.run(run_all())
    ids = set()
    for chunks in streams:
        *token_chunks, usage = chunks
        ids.add(token_chunks[0]["id"])
        assert all(c["id"] == token_chunks[0]["id"] for c in chunks)
        reasons = [c["choices"][0].get("finish_reason") for c in token_chunks]
        assert reasons[-1] == "length" and not any(reasons[:-1])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
        assert 1 <= len(token_chunks) <= MAX_TOKENS
    assert len(ids) == 16
    shared_server.wait_idle()


def test_official_openai_client(shared_server: InProcessServer, rng):
    client = openai.OpenAI(base_url=f"{shared_server.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    question = rng.choice(QUESTIONS)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert usage is not None and usage.completion_tokens >= 1 and finish in ("stop", "length")
    full = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert full.choices[0].message.content == "".join(pieces)

    completion = client.completions.create(model=model, prompt=random_prompt(rng),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)


def test_models_health_metrics_openapi(shared_server: InProcessServer):
    base = shared_server.base_url
    models = httpx.get(f"{base}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] > 0
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert f'model_name="{models["data"][0]["id"]}"' in metrics.text
    doc = httpx.get(f"{base}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "GenerateRequest",
            "ErrorResponse"} <= set(schemas)
    completion = schemas["CompletionRequest"]
    assert completion["properties"]["n"]["minimum"] == 1 and "prompt" in completion["required"]
