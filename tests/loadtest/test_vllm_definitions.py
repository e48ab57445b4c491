"""A recorded stream through attnserve's metric code and through vLLM's definitions, written
out here from vLLM's benchmark documentation: the same figures.

The fixtures (tests/loadtest/fixtures/, made with tests/loadtest/record_stream.py from the
scripted server in vLLM's and SGLang's stream formats) hold every line of each response
with its arrival time: token events with text, token events with empty text (special
tokens), the chat role announcement, the usage event, ``[DONE]`` after a delay, the blank
lines between events, and a request that failed with HTTP 500.

vLLM's definitions, as its benchmark documents them:
- a request's clock starts when it is sent; a token arrives with each streamed event that
  carries generated output (its text may be empty); the usage event and ``[DONE]`` carry
  none; a chat role announcement carries none either (vLLM's client happens to time it as
  the first token; its server sends it together with the first token);
- TTFT = first token's arrival - start; ITL = the gaps between successive token arrivals,
  pooled over requests; E2E latency = last token's arrival - start; TPOT = (E2E - TTFT) /
  (output tokens - 1) for answers of more than one token, output tokens being the
  server's usage count;
- mean, median, population std and linearly interpolated percentiles, in ms; request,
  output and total token throughput over the benchmark's duration; goodput = requests
  within every SLO per second (TPOT of a one-token answer counts as 0);
- ``max_output_tokens_per_s``: the most tokens that arrived in one whole second counted
  from the earliest start of a successful request; ``max_concurrent_requests``: the most
  successful requests whose span (start to last token, both seconds included) touched one
  such second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.client import RequestResult, StreamRecorder
from loadtest.stats import per_request_details, summarize

FIXTURES = Path(__file__).with_name("fixtures")
PERCENTILES = (50.0, 90.0, 99.0)
SLOS_MS = {"ttft": 200.0, "tpot": 70.0, "e2el": 1500.0}


# ---- vLLM's definitions, written out ----------------------------------------------------


def _events(lines: list[list[Any]]) -> list[tuple[float, Any]]:
    """(arrival, decoded JSON or '[DONE]') of each ``data:`` line."""
    out = []
    for at, line in lines:
        if line.startswith("data:"):
            payload = line.removeprefix("data:").strip()
            out.append((at, payload if payload == "[DONE]" else json.loads(payload)))
    return out


def _is_token(endpoint: str, event: Any, state: dict[str, int]) -> bool:
    if event == "[DONE]":
        return False
    if endpoint == "sglang":  # the running count grew
        count = event["meta_info"]["completion_tokens"]
        grew, state["count"] = count > state.get("count", 0), count
        return grew
    choices = event.get("choices") or []
    if not choices:
        return False  # the usage event
    if endpoint == "chat":
        delta, choice = choices[0]["delta"], choices[0]
        announcement = set(delta) <= {"role", "content"} and not delta.get("content") \
            and "role" in delta and choice.get("finish_reason") is None
        return not announcement
    return True


def _output_tokens(endpoint: str, events: list[tuple[float, Any]]) -> int:
    if endpoint == "sglang":
        return [e for _, e in events if e != "[DONE]"][-1]["meta_info"]["completion_tokens"]
    return next(e["usage"]["completion_tokens"] for _, e in events
                if e != "[DONE]" and e.get("usage"))


def _prompt_tokens(endpoint: str, events: list[tuple[float, Any]]) -> int:
    if endpoint == "sglang":
        return [e for _, e in events if e != "[DONE]"][-1]["meta_info"]["prompt_tokens"]
    return next(e["usage"]["prompt_tokens"] for _, e in events
                if e != "[DONE]" and e.get("usage"))


def vllm_request(endpoint: str, recorded: dict[str, Any]) -> dict[str, Any] | None:
    """One request's figures; None for a failed request."""
    if recorded["status"] != 200:
        return None
    events = _events(recorded["lines"])
    state: dict[str, int] = {}
    arrivals = np.array([at for at, e in events if _is_token(endpoint, e, state)])
    start = recorded["start"]
    ttft, latency = arrivals[0] - start, arrivals[-1] - start
    n = _output_tokens(endpoint, events)
    return {"start": start, "ttft": ttft, "itl": np.diff(arrivals).tolist(),
            "latency": latency, "tpot": (latency - ttft) / (n - 1) if n > 1 else None,
            "arrivals": arrivals, "output_len": n,
            "input_len": _prompt_tokens(endpoint, events)}


def _dist(name: str, seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    out = {f"mean_{name}_ms": ms.mean(), f"median_{name}_ms": np.median(ms),
           f"std_{name}_ms": ms.std()}
    for p in PERCENTILES:
        out[f"p{int(p)}_{name}_ms"] = np.percentile(ms, p)
    return out


def vllm_summary(recording: dict[str, Any]) -> dict[str, Any]:
    endpoint, duration = recording["endpoint"], recording["duration"]
    all_requests = [vllm_request(endpoint, r) for r in recording["requests"]]
    ok = [r for r in all_requests if r is not None]
    total_in = sum(r["input_len"] for r in ok)
    total_out = sum(r["output_len"] for r in ok)
    good = sum(r["ttft"] * 1000 <= SLOS_MS["ttft"] and (r["tpot"] or 0.0) * 1000 <= SLOS_MS["tpot"]
               and r["latency"] * 1000 <= SLOS_MS["e2el"] for r in ok)
    # Peaks over whole seconds from the earliest start: tokens by the second they arrived,
    # requests by every second from their start's to their last token's (a difference
    # array summed up).
    origin = min(r["start"] for r in ok)
    seconds = int(np.ceil(max(r["start"] + r["latency"] for r in ok) - origin)) + 1
    arrivals = np.concatenate([r["arrivals"] for r in ok])
    tokens = np.bincount(np.floor(arrivals - origin).astype(int), minlength=seconds)
    edges = np.zeros(seconds + 1, dtype=int)
    for r in ok:
        edges[int(np.floor(r["start"] - origin))] += 1
        edges[int(np.floor(r["start"] + r["latency"] - origin)) + 1] -= 1
    out: dict[str, Any] = {
        "completed": len(ok), "failed": len(all_requests) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "request_goodput": good / duration,
        "max_output_tokens_per_s": float(tokens.max()),
        "max_concurrent_requests": int(np.cumsum(edges).max()),
    }
    out |= _dist("ttft", [r["ttft"] for r in ok])
    out |= _dist("tpot", [r["tpot"] for r in ok if r["tpot"] is not None])
    out |= _dist("itl", [g for r in ok for g in r["itl"]])
    out |= _dist("e2el", [r["latency"] for r in ok])
    out["ttfts"] = [0.0 if r is None else r["ttft"] for r in all_requests]
    out["latencies"] = [0.0 if r is None else r["latency"] for r in all_requests]
    out["itls"] = [[] if r is None else r["itl"] for r in all_requests]
    out["output_lens"] = [0 if r is None else r["output_len"] for r in all_requests]
    out["start_times"] = [r["start"] for r in recording["requests"]]
    return out


# ---- attnserve's code on the same recording -----------------------------------------------


def replay(endpoint: str, recorded: dict[str, Any]) -> RequestResult:
    """What send_streaming_request makes of the recorded response."""
    recorder = StreamRecorder(endpoint, recorded["start"], recorded["expected_prompt_len"])
    if recorded["status"] != 200:
        recorder.result.error = f"HTTP {recorded['status']}: {recorded['lines']}"
        return recorder.result
    for at, line in recorded["lines"]:
        if not recorder.feed(line, at):
            break
    return recorder.finish()


def attnserve_summary(recording: dict[str, Any]) -> dict[str, Any]:
    results = [replay(recording["endpoint"], r) for r in recording["requests"]]
    return summarize(results, recording["duration"], PERCENTILES, SLOS_MS) \
        | per_request_details(results)


@pytest.mark.parametrize("fixture", ["vllm_completions_stream.json", "vllm_chat_stream.json",
                                     "sglang_generate_stream.json"])
def test_recorded_stream_gives_vllms_figures(fixture: str) -> None:
    recording = json.loads((FIXTURES / fixture).read_text())
    expected = vllm_summary(recording)
    got = attnserve_summary(recording)
    itls = expected.pop("itls")
    assert len(got["itls"]) == len(itls)
    for mine, theirs in zip(got["itls"], itls, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_the_recordings_hold_what_the_definitions_must_tell_apart() -> None:
    """Empty-text tokens, a role announcement, usage and [DONE] after the last token, a
    failure, several seconds: else the comparison above could not catch a difference."""
    completions = json.loads((FIXTURES / "vllm_completions_stream.json").read_text())
    lines = [line for r in completions["requests"] for _, line in r["lines"]]
    assert any('"text": ""' in line for line in lines)
    assert any('"choices": []' in line and '"usage"' in line for line in lines)
    assert any(r["status"] != 200 for r in completions["requests"])
    assert completions["duration"] > 3
    ok = [vllm_request("completions", r) for r in completions["requests"]]
    summary = vllm_summary(completions)
    assert 1 < summary["max_concurrent_requests"] < len(ok)
    for recorded in completions["requests"]:
        if recorded["status"] == 200:
            done = next(at for at, line in recorded["lines"] if line == "data: [DONE]")
            request = vllm_request("completions", recorded)
            assert done - recorded["start"] > request["latency"] + 0.02  # [DONE] 30 ms later
    chat = json.loads((FIXTURES / "vllm_chat_stream.json").read_text())
    first = _events(chat["requests"][0]["lines"])[0][1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
