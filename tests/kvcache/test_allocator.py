"""PageAllocator: unit tests and a hypothesis state machine against a plain dict of owners."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.allocator import SCRATCH_PAGE, OutOfPages, PageAllocator


def test_never_hands_out_the_scratch_page_and_runs_dry_cleanly() -> None:
    alloc = PageAllocator(9)
    assert alloc.num_total == 8 and alloc.num_free == 8
    pages = alloc.alloc(8)
    assert sorted(pages) == list(range(1, 9))
    assert SCRATCH_PAGE not in pages
    assert alloc.num_free == 0 and not alloc.can_alloc(1)
    with pytest.raises(OutOfPages):
        alloc.alloc(1)
    alloc.check_invariants()


def test_failed_alloc_takes_nothing() -> None:
    alloc = PageAllocator(5)
    alloc.alloc(2)
    with pytest.raises(OutOfPages):
        alloc.alloc(3)
    assert alloc.num_free == 2
    alloc.check_invariants()


def test_shared_page_is_free_only_after_last_owner() -> None:
    alloc = PageAllocator(4)
    [page] = alloc.alloc(1)
    alloc.incref([page])
    alloc.incref([page])
    assert alloc.refcount(page) == 3
    alloc.decref([page])
    alloc.decref([page])
    assert alloc.num_free == 2 and alloc.refcount(page) == 1
    alloc.decref([page])
    assert alloc.num_free == 3 and alloc.refcount(page) == 0
    alloc.check_invariants()


def test_misuse_is_refused() -> None:
    alloc = PageAllocator(4)
    with pytest.raises(ValueError):
        alloc.decref([1])  # free page
    with pytest.raises(ValueError):
        alloc.incref([2])  # free page
    with pytest.raises(ValueError):
        alloc.alloc(-1)
    with pytest.raises(ValueError):
        PageAllocator(1)
    assert alloc.alloc(0) == []
    alloc.check_invariants()


def test_check_invariants_catches_corruption() -> None:
    alloc = PageAllocator(4)
    alloc.alloc(1)
    alloc._free.append(alloc._free[0])  # a duplicate on the free list
    with pytest.raises(AssertionError):
        alloc.check_invariants()
    alloc = PageAllocator(4)
    [page] = alloc.alloc(1)
    alloc._free.append(page)  # referenced and free at once
    with pytest.raises(AssertionError):
        alloc.check_invariants()


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/incref/decref; the model is a dict page -> number of owners."""

    NUM_PAGES = 12

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(self.NUM_PAGES)
        self.owners: dict[int, int] = {}

    @rule(n=st.integers(0, 5))
    def alloc_pages(self, n: int) -> None:
        free = self.NUM_PAGES - 1 - len(self.owners)
        if n > free:
            with pytest.raises(OutOfPages):
                self.alloc.alloc(n)
            return
        pages = self.alloc.alloc(n)
        assert len(set(pages)) == n
        for page in pages:
            assert page not in self.owners and 1 <= page < self.NUM_PAGES
            self.owners[page] = 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def incref(self, data: st.DataObject) -> None:
        page = data.draw(st.sampled_from(sorted(self.owners)))
        self.alloc.incref([page])
        self.owners[page] += 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def decref(self, data: st.DataObject) -> None:
        page = data.draw(st.sampled_from(sorted(self.owners)))
        self.alloc.decref([page])
        self.owners[page] -= 1
        if self.owners[page] == 0:
            del self.owners[page]

    @invariant()
    def agrees_with_model(self) -> None:
        self.alloc.check_invariants()
        assert self.alloc.num_free == self.NUM_PAGES - 1 - len(self.owners)
        for page in range(1, self.NUM_PAGES):
            assert self.alloc.refcount(page) == self.owners.get(page, 0)


AllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_allocator_state_machine = AllocatorMachine.TestCase
