"""A radix tree over token ids whose edges carry KV pages: the prefix cache.

As in SGLang's RadixAttention, each edge holds a run of tokens and the pages that store
their K/V; a request whose prompt starts with a cached run reuses those pages instead of
recomputing them. Everything is at page granularity: an edge holds whole pages only
(`len(key) == len(pages) * page_size`), so with page size 16 a 200-token prefix caches
12 pages (192 tokens), and with page size 1 every token.

Ownership: the cache holds one allocator reference on every page in the tree. Requests that
use a cached prefix `lock` the node where their prefix ends, which pins that node and all its
ancestors; `evict` only trims unlocked leaves, least-recently-used first. Evictable leaves
sit in a heap keyed by last use that is kept up to date lazily (an entry is checked when
popped), so an eviction costs O(log n) per leaf instead of a walk over the whole tree.
Hybrid models (linear-attention layers) also keep state snapshots in the tree: a node may
hold the state slot (kvcache/state_slots.py) of the recurrent state after the tokens up to
its end. Such a prefix is only usable up to a snapshot, so `match_state` returns the
deepest snapshot on the matched path; a snapshot goes with its node's pages when they are
evicted, and `evict_snapshots` frees slots the same LRU way.
Pure Python.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kvcache.allocator import PageAllocator
from kvcache.state_slots import StateSlotAllocator


@dataclass(eq=False)
class RadixNode:
    key: list[int]  # the tokens of this edge: len(pages) * page_size of them
    pages: list[int]
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0  # locks on this node or on any descendant
    last_access: int = 0
    snapshot: int | None = None  # hybrid models: state slot after this node's last token

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass
class MatchResult:
    """The longest cached prefix: its pages (in position order), its length, its last node."""

    pages: list[int]
    num_tokens: int
    node: RadixNode
    snapshot: int | None = None  # match_state: the state slot to restore (None: zeros)


class RadixPrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int,
                 state_slots: StateSlotAllocator | None = None) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.allocator = allocator
        self.page_size = page_size
        self.state_slots = state_slots
        self._num_snapshots = 0
        self.root = RadixNode(key=[], pages=[], parent=None)
        self._clock = itertools.count(1)
        self._num_cached_pages = 0
        self._num_locked_pages = 0  # pages in nodes with lock_ref > 0
        # (last_access, tiebreak, node) for leaves that were evictable when pushed; stale
        # entries (node touched, locked, given children or removed since) are skipped.
        self._lru: list[tuple[int, int, RadixNode]] = []
        self._tiebreak = itertools.count()

    # -- statistics ------------------------------------------------------------------------

    @property
    def num_cached_pages(self) -> int:
        return self._num_cached_pages

    @property
    def num_snapshots(self) -> int:
        return self._num_snapshots

    @property
    def num_evictable_pages(self) -> int:
        """Pages in unlocked nodes: `evict` can release all of them."""
        return self._num_cached_pages - self._num_locked_pages

    # -- lookup and insertion --------------------------------------------------------------

    def match(self, token_ids: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `token_ids` in whole pages; marks the path as used.

        An edge matched only in part is split so that `node` ends exactly at the match.
        """
        ps = self.page_size
        limit = len(token_ids) // ps * ps
        now = next(self._clock)
        node, pos, pages = self.root, 0, []
        while pos < limit:
            child = node.children.get(tuple(token_ids[pos : pos + ps]))
            if child is None:
                break
            k = self._common_pages(child.key, token_ids, pos, (limit - pos) // ps)
            if k < len(child.pages):
                child = self._split(child, k)
            child.last_access = now
            pages.extend(child.pages)
            pos += k * ps
            node = child
        self._push_if_evictable(node)
        return MatchResult(pages, pos, node)

    def match_len(self, token_ids: Sequence[int]) -> int:
        """Tokens of `token_ids` that `match` (with state slots: `match_state`) would
        return, without touching the tree."""
        ps = self.page_size
        limit = len(token_ids) // ps * ps
        node, pos = self.root, 0
        resumable = 0  # the deepest whole node with a state snapshot
        while pos < limit:
            child = node.children.get(tuple(token_ids[pos : pos + ps]))
            if child is None:
                break
            k = self._common_pages(child.key, token_ids, pos, (limit - pos) // ps)
            pos += k * ps
            if k < len(child.pages):
                break
            node = child
            if child.snapshot is not None:
                resumable = pos
        return resumable if self.state_slots is not None else pos

    def match_state(self, token_ids: Sequence[int]) -> MatchResult:
        """`match`, cut back to the deepest node on the path that holds a state snapshot:
        a hybrid model can resume only where its recurrent state is known."""
        found = self.match(token_ids)
        node, depth = found.node, found.num_tokens
        while not node.is_root and node.snapshot is None:
            depth -= len(node.key)
            node = node.parent  # type: ignore[assignment]
        return MatchResult(found.pages[: depth // self.page_size], depth, node, node.snapshot)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> MatchResult:
        """Cache the whole pages of `token_ids`, stored in `pages` (position order).

        Only `min(len(pages), len(token_ids) // page_size)` pages are inserted. Where the tree
        already holds a position, its page stays and the caller's page is not taken; the
        returned `pages` are the tree's pages for the whole inserted prefix, so a caller can
        swap its duplicates for them. The cache takes its own reference on each page it adds.
        """
        ps = self.page_size
        num_pages = min(len(pages), len(token_ids) // ps)
        now = next(self._clock)
        node, pos, tree_pages = self.root, 0, []  # pos counts pages
        while pos < num_pages:
            first = tuple(token_ids[pos * ps : (pos + 1) * ps])
            child = node.children.get(first)
            if child is None:
                new_pages = list(pages[pos:num_pages])
                child = RadixNode(
                    key=list(token_ids[pos * ps : num_pages * ps]),
                    pages=new_pages,
                    parent=node,
                    last_access=now,
                )
                self.allocator.incref(new_pages)
                node.children[first] = child
                self._num_cached_pages += len(new_pages)
                tree_pages.extend(new_pages)
                node = child
                break
            k = self._common_pages(child.key, token_ids, pos * ps, num_pages - pos)
            if k < len(child.pages):
                child = self._split(child, k)
            child.last_access = now
            tree_pages.extend(child.pages)
            pos += k
            node = child
        self._push_if_evictable(node)
        return MatchResult(tree_pages, num_pages * ps, node)

    def add_snapshots(self, token_ids: Sequence[int], snapshots: dict[int, int]) -> None:
        """Give the tree the state slots in `snapshots` (token count -> slot): each is the
        state after `token_ids[:count]`, a prefix already inserted. A position the tree
        already has a snapshot for, or no longer holds (evicted meanwhile), frees the slot."""
        assert self.state_slots is not None, "a cache without state slots holds no snapshots"
        for count, slot in sorted(snapshots.items()):
            node = self._node_ending_at(token_ids, count)
            if node is None or node.snapshot is not None:
                self.state_slots.free(slot)
                continue
            node.snapshot = slot
            self._num_snapshots += 1

    def _node_ending_at(self, token_ids: Sequence[int], count: int) -> RadixNode | None:
        """The node whose edge ends after token_ids[:count] (an edge is split there if
        needed), or None if the tree does not hold that whole prefix."""
        ps = self.page_size
        if count <= 0 or count % ps:
            return None
        node, pos = self.root, 0
        while pos < count:
            child = node.children.get(tuple(token_ids[pos : pos + ps]))
            if child is None:
                return None
            k = self._common_pages(child.key, token_ids, pos, (count - pos) // ps)
            if k == 0:
                return None
            if k < len(child.pages):
                if pos + k * ps < count:
                    return None  # the tree's edge diverges before `count`
                child = self._split(child, k)
            pos += k * ps
            node = child
        return node

    # -- locking ---------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Pin `node` and its ancestors against eviction (one count per call)."""
        while not node.is_root:
            if node.lock_ref == 0:
                self._num_locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        while not node.is_root:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a radix node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._num_locked_pages -= len(node.pages)
                self._push_if_evictable(node)
            node = node.parent  # type: ignore[assignment]

    # -- eviction --------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Release `num_pages` pages from unlocked leaves, least recently used first, or all
        of them if fewer.

        A leaf is trimmed from its end, so exactly the pages needed go (a hybrid model's
        leaf goes whole: see below); a leaf emptied this way is removed and its parent may
        become an evictable leaf. Returns pages released.
        """
        released = 0
        ps = self.page_size
        while released < num_pages and self._lru:
            access, _, leaf = heapq.heappop(self._lru)
            if access != leaf.last_access or not self._is_evictable_leaf(leaf):
                continue  # stale entry
            first = tuple(leaf.key[:ps])
            self._drop_snapshot(leaf)  # it was the state after the leaf's last page
            take = min(len(leaf.pages), num_pages - released)
            if self.state_slots is not None:
                # a hybrid model resumes only at a snapshot: what is left of a leaf without
                # its snapshot serves nobody, so the whole leaf goes
                take = len(leaf.pages)
            dropped = leaf.pages[len(leaf.pages) - take :]
            del leaf.pages[len(leaf.pages) - take :]
            del leaf.key[len(leaf.key) - take * ps :]
            self.allocator.decref(dropped)
            self._num_cached_pages -= take
            released += take
            if leaf.pages:
                self._push(leaf)  # what is left of it stays evictable
                continue
            parent = leaf.parent
            assert parent is not None
            del parent.children[first]
            leaf.parent = None
            self._push_if_evictable(parent)
        return released

    def evict_snapshots(self, num_slots: int) -> int:
        """Free at least `num_slots` state slots if possible, by evicting whole unlocked
        leaves (pages and snapshot) least recently used first. Returns slots freed."""
        freed = 0
        while freed < num_slots and self._lru:
            access, _, leaf = self._lru[0]
            if access != leaf.last_access or not self._is_evictable_leaf(leaf):
                heapq.heappop(self._lru)
                continue
            had = leaf.snapshot is not None
            self.evict(len(leaf.pages))  # this leaf is the least recently used: it goes
            freed += had
        return freed

    def _drop_snapshot(self, node: RadixNode) -> None:
        if node.snapshot is not None:
            assert self.state_slots is not None
            self.state_slots.free(node.snapshot)
            node.snapshot = None
            self._num_snapshots -= 1

    def clear(self) -> int:
        """Drop every unlocked page. Returns pages released."""
        return self.evict(self.num_evictable_pages)

    # -- internals -------------------------------------------------------------------------

    def _common_pages(
        self, key: list[int], token_ids: Sequence[int], start: int, max_pages: int
    ) -> int:
        """Whole pages at the start of `key` equal to token_ids[start:], at most max_pages."""
        ps = self.page_size
        n = min(len(key) // ps, max_pages)
        if key[: n * ps] == list(token_ids[start : start + n * ps]):
            return n
        k = 0
        while k < n and key[k * ps : (k + 1) * ps] == list(
            token_ids[start + k * ps : start + (k + 1) * ps]
        ):
            k += 1
        return k

    def _split(self, node: RadixNode, num_pages: int) -> RadixNode:
        """Cut `node` after `num_pages` pages; returns the new upper part.

        The original object keeps the lower part, so locks held on it by requests still name
        the end of their prefix. The upper part inherits the lock count: every lock that
        pinned `node` pinned the whole edge.
        """
        ps = self.page_size
        parent = node.parent
        assert parent is not None and 0 < num_pages < len(node.pages)
        upper = RadixNode(
            key=node.key[: num_pages * ps],
            pages=node.pages[:num_pages],
            parent=parent,
            lock_ref=node.lock_ref,
            last_access=node.last_access,
        )
        parent.children[tuple(node.key[:ps])] = upper
        node.key = node.key[num_pages * ps :]
        node.pages = node.pages[num_pages:]
        node.parent = upper
        upper.children[tuple(node.key[:ps])] = node
        return upper

    def nodes(self) -> Iterator[RadixNode]:
        """Every node but the root, in no particular order."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @staticmethod
    def _is_evictable_leaf(node: RadixNode) -> bool:
        # a removed node has no parent, like the root: neither is ever evicted
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _push(self, node: RadixNode) -> None:
        heapq.heappush(self._lru, (node.last_access, next(self._tiebreak), node))
        if len(self._lru) > 2 * self._num_cached_pages + 1024:
            self._compact_lru()

    def _push_if_evictable(self, node: RadixNode) -> None:
        if self._is_evictable_leaf(node):
            self._push(node)

    def _compact_lru(self) -> None:
        """Drop stale entries: keep one entry per evictable leaf."""
        leaves = [n for n in self.nodes() if self._is_evictable_leaf(n)]
        self._lru = [(n.last_access, next(self._tiebreak), n) for n in leaves]
        heapq.heapify(self._lru)

    def all_pages(self) -> list[int]:
        """Every page the tree holds (for tests and statistics)."""
        return [p for node in self.nodes() for p in node.pages]

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree's structure or its counters are inconsistent."""
        ps = self.page_size
        assert not self.root.pages and not self.root.key and self.root.lock_ref == 0
        seen: set[int] = set()
        cached = locked = 0
        for node in self.nodes():
            assert node.pages, "a non-root node without pages"
            assert len(node.key) == len(node.pages) * ps, "key length is not pages * page_size"
            parent = node.parent
            assert parent is not None and parent.children.get(tuple(node.key[:ps])) is node, (
                "node not reachable under its first page's tokens"
            )
            assert node.lock_ref >= 0, "negative lock count"
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), (
                "a node has fewer locks than its children"
            )
            for page in node.pages:
                assert page not in seen, f"page {page} appears twice in the tree"
                seen.add(page)
                assert self.allocator.refcount(page) >= 1, f"cached page {page} is free"
            cached += len(node.pages)
            if node.lock_ref > 0:
                locked += len(node.pages)
        snapshots = [n.snapshot for n in self.nodes() if n.snapshot is not None]
        assert len(snapshots) == len(set(snapshots)) == self._num_snapshots, \
            "snapshot counter is off, or a slot is held twice"
        if snapshots:
            assert self.state_slots is not None
            assert all(self.state_slots.is_used(s) for s in snapshots), "a snapshot slot is free"
        assert cached == self._num_cached_pages, "cached-page counter is off"
        assert locked == self._num_locked_pages, "locked-page counter is off"
        queued = {id(n) for access, _, n in self._lru if access == n.last_access}
        for node in self.nodes():
            if self._is_evictable_leaf(node):
                assert id(node) in queued, "an evictable leaf is missing from the LRU heap"
