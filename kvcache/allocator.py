"""The page allocator: which KV pages are free, and how many owners each used page has.

Page 0 is the pool's scratch page and is never handed out, so ids 1..num_pages-1 are managed.
Pages are shared (a request and the radix prefix cache may both own one), so every page has
a reference count; a page is free exactly when its count is zero. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable

SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
    """Raised by `PageAllocator.alloc` when fewer pages are free than asked for."""


class PageAllocator:
    """O(1) alloc/free over a stack of free page ids, with per-page reference counts."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("the pool needs at least 2 pages (page 0 is the scratch page)")
        self.num_pages = num_pages  # including the scratch page
        self._refcounts = [0] * num_pages
        # Popped from the end: reversed so that the first allocations get the lowest ids.
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_total(self) -> int:
        """Pages that can be handed out (the scratch page excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def refcount(self, page: int) -> int:
        return self._refcounts[page]

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take `n` free pages, each with one reference. Raises OutOfPages if too few are free."""
        if n < 0:
            raise ValueError("cannot allocate a negative number of pages")
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one owner to pages that are already in use."""
        for page in pages:
            if self._refcounts[page] <= 0:
                raise ValueError(f"incref of page {page}, which is free")
            self._refcounts[page] += 1

    def decref(self, pages: Iterable[int]) -> None:
        """Drop one owner; a page whose count reaches zero is free again."""
        for page in pages:
            count = self._refcounts[page]
            if count <= 0:
                raise ValueError(f"decref of page {page}, which is already free")
            self._refcounts[page] = count - 1
            if count == 1:
                self._free.append(page)

    def check_invariants(self) -> None:
        """Raise AssertionError if the free list and the reference counts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "free list holds duplicates"
        assert SCRATCH_PAGE not in free, "the scratch page is on the free list"
        assert self._refcounts[SCRATCH_PAGE] == 0, "the scratch page has owners"
        for page in range(1, self.num_pages):
            count = self._refcounts[page]
            assert count >= 0, f"page {page} has refcount {count}"
            assert (count == 0) == (page in free), (
                f"page {page}: refcount {count} but {'on' if page in free else 'off'} "
                "the free list"
            )
