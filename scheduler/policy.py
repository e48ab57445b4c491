"""Admission policy helpers: the order waiting requests are considered in, and prefix overlap.

Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvcache.radix import RadixPrefixCache
from scheduler.request import Request

SCHEDULE_POLICIES = ("fcfs", "lpm")

# Longest-prefix-match ordering costs one tree walk per waiting request per step; past this
# queue length fall back to FCFS (SGLang does the same) so a deep backlog stays cheap.
LPM_MAX_WAITING = 128

# A waiting request is held back for a prefix that a running request is still prefilling
# only if it would reuse at least this many more tokens than the cache holds now: holding
# costs it a step or more of latency, and a chat template's shared header alone (a page or
# two) is not worth that.
MIN_IN_FLIGHT_SHARE_TOKENS = 32


def admission_order(
    waiting: Iterable[Request], policy: str, cache: RadixPrefixCache | None
) -> list[Request]:
    """The waiting requests in the order admission should try them.

    fcfs: queue order (preempted requests sit at the head). lpm: preempted requests first,
    then the longest cached prefix first; ties keep queue order.
    """
    queue = list(waiting)
    if policy == "fcfs" or cache is None or len(queue) > LPM_MAX_WAITING:
        return queue

    def key(req: Request) -> tuple[int, int]:
        cached = cache.match_len(req.all_token_ids[:-1])
        return (0 if req.num_preemptions > 0 else 1, -cached)

    return sorted(queue, key=key)


def common_prefix_pages(a: Sequence[int], b: Sequence[int], page_size: int) -> int:
    """Whole pages at the start of `a` and `b` that hold the same tokens."""
    n = min(len(a), len(b)) // page_size
    if list(a[: n * page_size]) == list(b[: n * page_size]):
        return n
    lo, hi = 0, n  # a[:lo pages] == b[:lo pages], and the first hi pages differ somewhere
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[: mid * page_size]) == list(b[: mid * page_size]):
            lo = mid
        else:
            hi = mid
    return lo
