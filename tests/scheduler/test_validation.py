"""The one request check (scheduler/validation.py): each limit at its boundary, and a request
that fits exactly also runs to the end without running out of pages."""

from __future__ import annotations

import pytest

from kvcache.allocator import PageAllocator
from scheduler.request import Request, SamplingParams
from scheduler.scheduler import Scheduler
from scheduler.validation import RequestRejected
from tests.scheduler.sim import EOS, VOCAB, FakeRunner, run_to_completion, scheduler_config

PAGE = 16


def _scheduler(num_pages: int, max_model_len: int) -> Scheduler:
    config = scheduler_config(page_size=PAGE, max_model_len=max_model_len, vocab_size=VOCAB)
    return Scheduler(config, PageAllocator(1 + num_pages))  # + the scratch page


def _params(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)  # type: ignore[arg-type]


def _runs_to_the_end(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> None:
    req = Request("r", prompt, _params(max_tokens), eos_token_ids=frozenset({EOS}))
    scheduler.add_request(req)
    run_to_completion(scheduler, FakeRunner(scheduler))
    assert len(req.output_token_ids) == max_tokens


def test_max_model_len_bounds_prompt_plus_max_tokens() -> None:
    scheduler = _scheduler(num_pages=64, max_model_len=100)
    scheduler.validate([1] * 90, _params(10))  # 100 tokens: exactly the limit
    with pytest.raises(RequestRejected, match="maximum context length is 100 tokens.*requested "
                                              r"101 tokens \(90 in the prompt, 11 for") as e:
        scheduler.validate([1] * 90, _params(11))
    assert e.value.param == "max_tokens"
    # A prompt of max_model_len tokens leaves no room for the one token it must generate.
    with pytest.raises(RequestRejected, match="maximum context length"):
        scheduler.validate([1] * 100, _params(1))
    scheduler.validate([1] * 99, _params(1))
    _runs_to_the_end(scheduler, [1] * 90, 10)


def test_the_pool_must_hold_all_but_the_last_generated_token() -> None:
    scheduler = _scheduler(num_pages=4, max_model_len=1000)  # 64 KV slots
    scheduler.validate([1] * 60, _params(5))  # 64 stored tokens: the 65th is never fed back
    with pytest.raises(RequestRejected, match=r"needs 65 tokens of KV cache \(60 in the prompt "
                                              r"and 5 generated.*pool holds 64") as e:
        scheduler.validate([1] * 60, _params(6))
    assert e.value.param == "max_tokens"
    _runs_to_the_end(scheduler, [1] * 60, 5)


@pytest.mark.parametrize("prompt, params, message, param", [
    ([], _params(1), "the prompt is empty", "prompt"),
    ([1, VOCAB], _params(1), rf"prompt token ids must be in \[0, {VOCAB}\)", "prompt"),
    ([-1], _params(1), "prompt token ids", "prompt"),
    ([1], _params(1, top_p=0.0), "top_p", "top_p"),
    ([1], _params(0), "max_tokens must be at least 1", "max_tokens"),
])
def test_bad_requests_say_why(prompt: list[int], params: SamplingParams, message: str,
                              param: str | None) -> None:
    with pytest.raises(RequestRejected, match=message) as e:
        _scheduler(num_pages=8, max_model_len=100).validate(prompt, params)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("fields, param, message", [
    ({"presence_penalty": 2.5}, "presence_penalty", r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -2.1}, "frequency_penalty", r"frequency_penalty must be in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "greater than zero"),
    ({"logit_bias": {5: 100.5}}, "logit_bias", r"must be in \[-100, 100\]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias", "token ids"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias", r"logit_bias token ids must be in \[0,"),
    ({"min_tokens": 11}, "min_tokens", r"between 0 and max_tokens \(10\)"),
    ({"n": 0}, "n", "n must be at least 1"),
    ({"n": 3, "best_of": 2}, "best_of", "best_of must be greater than or equal to n, got n=3"),
    ({"best_of": 2, "temperature": 0.0}, "best_of", "needs sampling"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "between 0 and 20"),
])
def test_sampling_params_are_refused_with_the_field_named(
    fields: dict[str, object], param: str, message: str
) -> None:
    scheduler = _scheduler(num_pages=64, max_model_len=1000)
    with pytest.raises(RequestRejected, match=message) as e:
        scheduler.validate([1] * 5, _params(10, **fields))
    assert e.value.param == param


def test_sampling_params_in_range_pass() -> None:
    scheduler = _scheduler(num_pages=64, max_model_len=1000)
    scheduler.validate([1] * 5, _params(
        10, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.5,
        logit_bias={0: -100.0, VOCAB - 1: 100.0}, min_tokens=10, n=2, best_of=4,
        prompt_logprobs=0))
