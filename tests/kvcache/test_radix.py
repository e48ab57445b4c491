"""RadixPrefixCache: unit tests, and a hypothesis state machine against a flat reference.

The reference maps every cached page-aligned prefix (a tuple of tokens) to the page that holds
its last page; a match is the longest run of such prefixes. That is what a radix tree is a
compressed form of, so the two must agree after any sequence of inserts, locks and evictions.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.allocator import PageAllocator
from kvcache.radix import RadixNode, RadixPrefixCache


def _cache(num_pages: int = 64, page_size: int = 4) -> tuple[PageAllocator, RadixPrefixCache]:
    alloc = PageAllocator(num_pages)
    return alloc, RadixPrefixCache(alloc, page_size)


def _insert_as_request(
    alloc: PageAllocator, cache: RadixPrefixCache, tokens: list[int]
) -> list[int]:
    """What a finishing request does: own pages, insert them, drop its own references."""
    pages = alloc.alloc(-(-len(tokens) // cache.page_size))
    result = cache.insert(tokens, pages)
    alloc.decref(pages)
    return result.pages


def test_match_is_whole_pages_only() -> None:
    alloc, cache = _cache(page_size=4)
    tokens = list(range(100, 110))  # 10 tokens: 2 whole pages + 2 tokens
    pages = alloc.alloc(3)
    result = cache.insert(tokens, pages)
    assert result.pages == pages[:2] and result.num_tokens == 8
    assert alloc.refcount(pages[0]) == 2 and alloc.refcount(pages[2]) == 1  # partial page not kept
    m = cache.match(tokens)
    assert (m.pages, m.num_tokens) == (pages[:2], 8)
    m = cache.match(tokens[:7])
    assert (m.pages, m.num_tokens) == (pages[:1], 4)
    m = cache.match(tokens[:4] + [0, 0, 0, 0])
    assert (m.pages, m.num_tokens) == (pages[:1], 4)
    assert cache.match([1, 2, 3, 4]).num_tokens == 0
    assert cache.match_len(tokens) == 8 and cache.match_len(tokens[:7]) == 4
    cache.check_invariants()


def test_page_size_one_matches_every_token() -> None:
    alloc, cache = _cache(page_size=1)
    a = [5, 6, 7, 8, 9]
    pages = alloc.alloc(5)
    cache.insert(a, pages)
    m = cache.match([5, 6, 7, 1])
    assert (m.pages, m.num_tokens) == (pages[:3], 3)
    b = [5, 6, 7, 1, 2]
    b_pages = alloc.alloc(5)
    result = cache.insert(b, b_pages)
    assert result.pages == pages[:3] + b_pages[3:]
    assert cache.num_cached_pages == 7
    cache.check_invariants()


def test_insert_dedups_pages_already_cached() -> None:
    alloc, cache = _cache(page_size=2)
    first = alloc.alloc(3)
    cache.insert([1, 2, 3, 4, 5, 6], first)
    second = alloc.alloc(4)
    result = cache.insert([1, 2, 3, 4, 5, 6, 7, 8], second)
    assert result.pages == first + second[3:]
    assert [alloc.refcount(p) for p in second] == [1, 1, 1, 2]  # duplicates not taken
    assert cache.num_cached_pages == 4
    cache.check_invariants()


def test_split_keeps_both_branches_and_locks() -> None:
    alloc, cache = _cache(page_size=2)
    a_pages = alloc.alloc(3)
    node_a = cache.insert([1, 1, 2, 2, 3, 3], a_pages).node
    cache.lock(node_a)
    b = cache.insert([1, 1, 9, 9], alloc.alloc(2))  # splits a's edge after one page
    assert b.pages[0] == a_pages[0]
    assert cache.match([1, 1, 2, 2, 3, 3]).pages == a_pages
    # the lock on a still pins the shared first page, b's own page is evictable
    assert cache.num_evictable_pages == 1
    cache.check_invariants()
    cache.unlock(node_a)
    assert cache.num_evictable_pages == 4
    cache.check_invariants()


def test_locked_nodes_are_never_evicted() -> None:
    alloc, cache = _cache(num_pages=16, page_size=2)
    kept = _insert_as_request(alloc, cache, [1, 2, 3, 4, 5, 6])
    _insert_as_request(alloc, cache, [1, 2, 3, 4, 7, 8, 9, 9])
    _insert_as_request(alloc, cache, [4, 4, 4, 4])
    node = cache.match([1, 2, 3, 4, 5, 6]).node
    cache.lock(node)
    released = cache.evict(100)
    assert released == 4  # [7 8 9 9] and [4 4 4 4], nothing on the locked path
    assert cache.match([1, 2, 3, 4, 5, 6, 0]).pages == kept
    assert all(alloc.refcount(p) == 1 for p in kept)
    assert alloc.num_free == 15 - 3
    cache.check_invariants()
    cache.unlock(node)
    with pytest.raises(ValueError):
        cache.unlock(node)  # one unlock per lock
    assert cache.clear() == 3 and alloc.num_free == 15 and cache.num_cached_pages == 0
    cache.check_invariants()


def test_eviction_is_least_recently_used_first_and_trims_leaves() -> None:
    alloc, cache = _cache(num_pages=32, page_size=2)
    x = _insert_as_request(alloc, cache, [1, 1, 1, 1, 1, 1])
    y = _insert_as_request(alloc, cache, [2, 2, 2, 2, 2, 2])
    z = _insert_as_request(alloc, cache, [3, 3, 3, 3, 3, 3])
    cache.match([1, 1, 1, 1, 1, 1])  # x is now the most recently used
    assert cache.evict(2) == 2  # y's last two pages
    assert cache.match_len([2, 2, 2, 2, 2, 2]) == 2
    assert alloc.refcount(y[0]) == 1 and alloc.refcount(y[1]) == 0 and alloc.refcount(y[2]) == 0
    assert cache.evict(2) == 2  # y's last page, then z's last page (z is older than x)
    assert cache.match_len([2, 2]) == 0
    assert cache.match_len([3, 3, 3, 3, 3, 3]) == 4
    assert cache.match_len([1, 1, 1, 1, 1, 1]) == 6
    assert alloc.refcount(z[2]) == 0 and all(alloc.refcount(p) == 1 for p in x)
    cache.check_invariants()


def test_emptied_leaf_exposes_its_parent() -> None:
    alloc, cache = _cache(page_size=1)
    _insert_as_request(alloc, cache, [1, 2, 3])
    _insert_as_request(alloc, cache, [1, 2, 4])  # root -> [1 2] -> {[3], [4]}
    assert cache.evict(4) == 4
    assert cache.num_cached_pages == 0 and not cache.root.children
    assert alloc.num_free == alloc.num_total
    cache.check_invariants()


def _tree_contents(cache: RadixPrefixCache) -> dict[tuple[int, ...], int]:
    """Every cached page-aligned prefix -> the page holding its last page."""
    ps = cache.page_size
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[RadixNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for i, page in enumerate(node.pages):
            out[prefix + tuple(node.key[: (i + 1) * ps])] = page
        full = prefix + tuple(node.key)
        stack.extend((child, full) for child in node.children.values())
    return out


class RadixMachine(RuleBasedStateMachine):
    NUM_PAGES = 40

    def __init__(self) -> None:
        super().__init__()
        self.page_size = 1
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.cache = RadixPrefixCache(self.alloc, 1)
        self.ref: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[RadixNode, tuple[int, ...]]] = []

    @precondition(lambda self: not self.ref and not self.locks)
    @rule(page_size=st.sampled_from([1, 2, 3]))
    def set_page_size(self, page_size: int) -> None:
        self.page_size = page_size
        self.cache = RadixPrefixCache(self.alloc, page_size)

    def _ref_match(self, tokens: list[int]) -> list[int]:
        ps, pages = self.page_size, []
        while (len(pages) + 1) * ps <= len(tokens):
            page = self.ref.get(tuple(tokens[: (len(pages) + 1) * ps]))
            if page is None:
                break
            pages.append(page)
        return pages

    @rule(tokens=st.lists(st.integers(0, 2), max_size=12))
    def insert(self, tokens: list[int]) -> None:
        n = len(tokens) // self.page_size
        if not self.alloc.can_alloc(n):
            self._evict_and_check(n - self.alloc.num_free)
        if not self.alloc.can_alloc(n):
            return
        pages = self.alloc.alloc(n)
        result = self.cache.insert(tokens, pages)
        self.alloc.decref(pages)
        for i in range(n):
            self.ref.setdefault(tuple(tokens[: (i + 1) * self.page_size]), pages[i])
        assert result.pages == self._ref_match(tokens)
        assert result.num_tokens == n * self.page_size

    @rule(tokens=st.lists(st.integers(0, 2), max_size=12), lock=st.booleans())
    def match(self, tokens: list[int], lock: bool) -> None:
        expected = self._ref_match(tokens)
        assert self.cache.match_len(tokens) == len(expected) * self.page_size
        result = self.cache.match(tokens)
        assert result.pages == expected
        assert result.num_tokens == len(expected) * self.page_size
        if lock and result.pages:
            self.cache.lock(result.node)
            self.locks.append((result.node, tuple(tokens[: result.num_tokens])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        node, _ = self.locks.pop(i)
        self.cache.unlock(node)

    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        self._evict_and_check(n)

    def _evict_and_check(self, n: int) -> None:
        evictable = self.cache.num_evictable_pages
        released = self.cache.evict(n)
        assert released == min(n, evictable)
        after = _tree_contents(self.cache)
        assert after.items() <= self.ref.items()
        assert len(self.ref) - len(after) == released
        for _, prefix in self.locks:  # a locked path keeps every page
            for i in range(1, len(prefix) // self.page_size + 1):
                assert prefix[: i * self.page_size] in after
        self.ref = after

    @invariant()
    def consistent(self) -> None:
        self.cache.check_invariants()
        self.alloc.check_invariants()
        assert _tree_contents(self.cache) == self.ref
        assert all(self.alloc.refcount(p) == 1 for p in self.ref.values())
        assert self.alloc.num_free == self.alloc.num_total - len(self.ref)
        assert self.cache.num_cached_pages == len(self.ref)

    def teardown(self) -> None:
        for node, _ in self.locks:
            self.cache.unlock(node)
        self.cache.clear()
        assert self.alloc.num_free == self.alloc.num_total


RadixMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
test_radix_state_machine = RadixMachine.TestCase


def test_a_hybrid_match_ends_at_the_deepest_state_snapshot() -> None:
    """With state slots (a hybrid model), a prefix is only usable up to a snapshot:
    `match_state` cuts back to the deepest one on the path and restores its slot, and
    `match_len` (the lpm policy's ranking) agrees without touching the tree; evicting a
    leaf frees its snapshot's slot with its pages."""
    from kvcache.state_slots import StateSlotAllocator

    slots = StateSlotAllocator(8)
    cache = RadixPrefixCache(PageAllocator(32), 4, slots)
    tokens = list(range(100, 164))
    pages = cache.allocator.alloc(16)
    cache.insert(tokens, pages)
    s16, s48 = slots.alloc(), slots.alloc()
    cache.add_snapshots(tokens, {16: s16, 48: s48})
    cache.check_invariants()
    for prompt, expected, slot in ((tokens[:60], 48, s48), (tokens[:40], 16, s16),
                                   (tokens[:12], 0, None), (tokens[:16] + [1] * 20, 16, s16)):
        assert cache.match_len(prompt) == expected
        found = cache.match_state(prompt)
        assert (found.num_tokens, found.snapshot) == (expected, slot)
        assert found.pages == pages[: expected // 4]
    cache.check_invariants()
    cache.allocator.decref(pages)
    assert cache.clear() == 16 and slots.num_free == slots.num_total
    cache.check_invariants()
