"""EngineCore.reset_prefix_cache drops every cached page that no running request uses, and
AsyncEngine.reset_prefix_cache reaches it from the event loop through the engine thread."""

from __future__ import annotations

import asyncio

from scheduler.request import SamplingParams
from server.engine import AsyncEngine
from tests.server.engine_fixtures import LONG_TEXT, make_llm, smollm2

GREEDY = SamplingParams(temperature=0.0, max_tokens=2)


def test_reset_drops_unlocked_pages_and_keeps_running_ones() -> None:
    llm = make_llm(page_size=16)
    engine = llm.engine
    prompt = smollm2().tokenizer.encode(LONG_TEXT)[:40]
    llm.generate([prompt], GREEDY)
    cached = engine.scheduler.stats.num_pages_cached
    assert cached == 2  # 41 tokens computed (40 + 1 fed back): 2 whole pages
    assert engine.reset_prefix_cache() == cached
    assert engine.scheduler.stats.num_pages_cached == 0
    assert engine.scheduler.stats.num_pages_free == engine.scheduler.stats.num_pages_total
    # a request still running keeps its pages locked in the tree
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=5))
    engine.step()  # prefill: its 2 whole pages are inserted and locked
    assert engine.reset_prefix_cache() == 0
    assert engine.scheduler.stats.num_pages_cached == 2
    while engine.has_unfinished():
        engine.step()
    assert engine.reset_prefix_cache() == 2
    assert make_llm(enable_prefix_cache=False).engine.reset_prefix_cache() == 0


def test_async_engine_bridge() -> None:
    llm = make_llm(page_size=16)
    prompt = smollm2().tokenizer.encode(LONG_TEXT)[:40]
    llm.generate([prompt], GREEDY)

    async def run() -> int:
        engine = AsyncEngine(lambda: llm.engine, max_queued_requests=8)
        engine.start()
        try:
            assert engine.wait_ready(60)
            return await engine.reset_prefix_cache()
        finally:
            engine.shutdown()

    assert asyncio.run(run()) == 2
    assert llm.engine.scheduler.stats.num_pages_cached == 0
