"""The engine refuses a request at submission exactly when it cannot fit (one check, in
scheduler/validation.py), and a request at each limit runs to its last token on the real
SmolLM2: max_model_len bounds prompt + max_tokens; the KV pool must hold all but the last
generated token."""

from __future__ import annotations

import pytest

from server.engine import RequestRejected, SamplingParams
from tests.server.engine_fixtures import make_llm, smollm2


def _prompt(n: int) -> list[int]:
    return smollm2().tokenizer.encode("one two three four five six seven eight nine ten " * 20)[:n]


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_a_request_at_each_limit_runs_and_one_more_token_is_refused() -> None:
    # 64 KV slots (4 pages of 16) and a context of 48 tokens.
    llm = make_llm(kv_cache_tokens=64, page_size=16, max_model_len=48)
    assert llm.engine.pool.num_tokens == 64 and llm.engine.max_model_len == 48
    [at_len] = llm.generate([_prompt(40)], _params(8))  # 48 = max_model_len
    assert len(at_len.token_ids) == 8 and at_len.finish_reason == "length"
    with pytest.raises(RequestRejected, match="maximum context length is 48") as e:
        llm.engine.add_request(_prompt(40), _params(9))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestRejected, match="maximum context length"):
        llm.engine.add_request(_prompt(48), _params(1))  # a full prompt leaves no room

    llm = make_llm(kv_cache_tokens=64, page_size=16, max_model_len=128)
    [at_pool] = llm.generate([_prompt(60)], _params(5))  # 64 tokens stored, the 65th never
    assert len(at_pool.token_ids) == 5 and at_pool.finish_reason == "length"
    with pytest.raises(RequestRejected, match="needs 65 tokens of KV cache.*holds 64"):
        llm.engine.add_request(_prompt(60), _params(6))
    assert not llm.engine.has_unfinished()
