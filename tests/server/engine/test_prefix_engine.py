"""Issue 3 (a, b): the prefix cache changes no greedy token and hits exactly what it should."""

from __future__ import annotations

import pytest

from scheduler.request import SamplingParams
from tests.server.engine_fixtures import LONG_TEXT, make_llm, smollm2

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def system_prompt_workload() -> tuple[list[int], list[list[int]]]:
    tok = smollm2().tokenizer
    system = tok.encode(LONG_TEXT * 4)[:200]
    questions = ["Who are you?", "Name a color.", "Count to three.", "Say hi.", "What is 2+2?",
                 "Name a fruit.", "Name a planet.", "Name an ocean."]
    return system, [system + tok.encode(" " + q) for q in questions]


@pytest.mark.parametrize("page_size", [1, 16])
def test_system_prompt_workload_same_tokens_and_exact_hits(page_size: int) -> None:
    system, prompts = system_prompt_workload()
    layout = "token" if page_size == 1 else "nhd"
    outputs = {}
    for cache in (False, True):
        llm = make_llm(kv_layout=layout, page_size=page_size, enable_prefix_cache=cache)
        first = llm.generate(prompts[:1], GREEDY)  # the first finishes before the others arrive
        rest = llm.generate(prompts[1:], GREEDY)
        outputs[cache] = [r.token_ids for r in first + rest]
        stats = llm.engine.scheduler.stats
        if cache:
            # whole pages of the 200 shared tokens: 192 with page size 16, all 200 with page size 1
            shared = 200 // page_size * page_size
            assert stats.prefix_cache_hit_tokens == 7 * shared
            assert [r.num_cached_tokens for r in rest] == [shared] * 7
        else:
            assert stats.prefix_cache_hit_tokens == 0
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("page_size", [1, 16])
def test_multi_turn_chat_same_tokens(page_size: int) -> None:
    tok = smollm2().tokenizer
    layout = "token" if page_size == 1 else "nhd"
    transcripts = {}
    for cache in (False, True):
        llm = make_llm(kv_layout=layout, page_size=page_size, enable_prefix_cache=cache)
        history: list[int] = tok.apply_chat_template([{"role": "user", "content": "Hello!"}])
        turns = []
        hits = 0
        for turn in ("Tell me a fact.", "Another one.", "Thanks!"):
            result = llm.generate([history], GREEDY)[0]
            turns.append(result.token_ids)
            hits += result.num_cached_tokens
            history = history + result.token_ids + tok.encode(f"\nuser: {turn}\nassistant:")
        transcripts[cache] = turns
        if cache:
            assert hits > 0  # each turn reuses the previous turn's prompt and answer
    assert transcripts[True] == transcripts[False]
