"""Admission order and page-granular prefix overlap."""

from __future__ import annotations

import random

from kvcache.allocator import PageAllocator
from kvcache.radix import RadixPrefixCache
from scheduler.policy import LPM_MAX_WAITING, admission_order, common_prefix_pages
from scheduler.request import Request, SamplingParams


def _naive_common_pages(a: list[int], b: list[int], page_size: int) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n // page_size


def test_common_prefix_pages_matches_a_token_by_token_count() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(40))]
        ps = rng.choice([1, 2, 3, 16])
        assert common_prefix_pages(a, b, ps) == _naive_common_pages(a, b, ps)


def _cache_with(prefix: list[int], page_size: int = 4) -> RadixPrefixCache:
    alloc = PageAllocator(64)
    cache = RadixPrefixCache(alloc, page_size)
    pages = alloc.alloc(len(prefix) // page_size)
    cache.insert(prefix, pages)
    return cache


def _req(rid: str, prompt: list[int], preempted: bool = False) -> Request:
    req = Request(rid, prompt, SamplingParams())
    req.num_preemptions = int(preempted)
    return req


def test_lpm_puts_preempted_first_then_longest_match_then_arrival() -> None:
    hot = list(range(1, 17))
    cache = _cache_with(hot)
    queue = [
        _req("cold", [99] * 20),
        _req("warm", hot[:8] + [98] * 12),
        _req("hot", hot + [97]),
        _req("preempted", [96] * 20, preempted=True),
        _req("hot2", hot + [95]),
    ]
    order = [r.request_id for r in admission_order(queue, "lpm", cache)]
    assert order == ["preempted", "hot", "hot2", "warm", "cold"]
    assert admission_order(queue, "fcfs", cache) == queue
    assert admission_order(queue, "lpm", None) == queue  # no cache: nothing to match


def test_lpm_falls_back_to_fcfs_on_a_deep_queue() -> None:
    hot = list(range(1, 17))
    cache = _cache_with(hot)
    queue = [_req(f"c{i}", [99] * 8) for i in range(LPM_MAX_WAITING)] + [_req("hot", hot + [1])]
    assert admission_order(queue, "lpm", cache) == queue
    assert admission_order(queue[1:], "lpm", cache)[0].request_id == "hot"
