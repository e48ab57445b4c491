"""Request bodies and stream events of each endpoint, as their servers document them."""

from __future__ import annotations

import json

import pytest

from loadtest.client import StreamRecorder
from loadtest.protocols import SamplingOptions, StreamParser, build_body
from loadtest.workloads import Turn


def test_bodies_use_each_servers_own_field_names() -> None:
    turn = Turn(output_len=7, prompt_len=3, token_ids=[11, 12, 13])
    sampling = SamplingOptions(temperature=0.5)
    completions = build_body("completions", "m", turn, [], sampling)
    assert completions["max_tokens"] == 7 and completions["prompt"] == [11, 12, 13]
    assert completions["stream_options"] == {"include_usage": True}
    assert completions["ignore_eos"] is True and completions["model"] == "m"
    native = build_body("generate", "m", turn, [], sampling)
    assert native["sampling_params"] == {"max_tokens": 7, "temperature": 0.5,
                                         "ignore_eos": True}
    assert native["input_ids"] == [11, 12, 13] and "model" not in native
    sglang = build_body("sglang", "m", turn, [], sampling)  # SGLang: max_new_tokens
    assert sglang["sampling_params"] == {"max_new_tokens": 7, "temperature": 0.5,
                                         "ignore_eos": True}
    assert sglang["stream"] is True


def _replay(endpoint: str, events: list[dict | str]) -> StreamRecorder:
    recorder = StreamRecorder(endpoint, start=0.0)
    for i, event in enumerate(events):
        payload = event if isinstance(event, str) else json.dumps(event)
        recorder.feed(f"data: {payload}", 0.1 * (i + 1))
        recorder.feed("", 0.1 * (i + 1))
    return recorder


def test_sglang_text_is_the_whole_text_so_far_unless_sent_in_pieces() -> None:
    def event(text: str, n: int, ids: list[int] | None = None) -> dict:
        out: dict = {"text": text, "meta_info": {"completion_tokens": n, "prompt_tokens": 5}}
        if ids is not None:
            out["output_ids"] = ids
        return out

    # Default: cumulative text; a repeated piece ("\n" after "\n") is still told apart
    # by the output_ids count when the server sends them.
    cumulative = _replay("sglang", [event("a", 1), event("a\n", 2), event("a\n\n", 3),
                                    event("a\n\n", 3), "[DONE]"]).finish()
    assert cumulative.generated_text == "a\n\n" and cumulative.output_tokens == 3
    assert cumulative.ttft == pytest.approx(0.1) and len(cumulative.itl) == 2  # 4th: no token
    assert cumulative.prompt_len == 5
    pieces = _replay("sglang", [event("a", 1, [7]), event("\n", 2, [8]), event("\n", 3, [8]),
                                "[DONE]"]).finish()
    assert pieces.generated_text == "a\n\n" and pieces.output_tokens == 3


def test_chat_role_announcement_is_not_a_token_but_a_content_event_is() -> None:
    def chat(delta: dict, finish: str | None = None) -> dict:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    parser = StreamParser("chat")
    assert not parser.parse(chat({"role": "assistant", "content": ""})).carries_token
    assert not parser.parse(chat({"role": "assistant"})).carries_token
    assert parser.parse(chat({"role": "assistant", "content": "Hi"})).carries_token  # attnserve
    assert parser.parse(chat({"content": ""})).carries_token  # a special token
    assert parser.parse(chat({"reasoning_content": "hm"})).carries_token
    assert parser.parse(chat({"role": "assistant", "content": ""}, "stop")).carries_token
    assert not parser.parse({"choices": [], "usage": {"completion_tokens": 3}}).carries_token


def test_attnserve_native_events_count_tokens_by_ids() -> None:
    result = _replay("generate", [
        {"text": "", "token_ids": [5], "completion_tokens": 1},  # held-back text
        {"text": "ab", "token_ids": [6, 7], "completion_tokens": 3},
        {"text": "c", "token_ids": [8], "completion_tokens": 4, "finished": True,
         "finish_reason": "length"},
        "[DONE]"]).finish()
    assert result.generated_text == "abc" and result.output_tokens == 4
    assert result.output_tokens_source == "usage"  # the running count of the last event
    assert result.ttft == pytest.approx(0.1) and result.latency == pytest.approx(0.3)


def test_an_error_event_ends_the_request_as_failed() -> None:
    recorder = _replay("completions", [{"choices": [{"text": "x"}]},
                                       {"error": {"message": "engine died"}}])
    result = recorder.finish()
    assert not result.success and result.error == "engine died"
