"""Reads the scheduler's stats object into the few numbers the metrics need.

The stats dataclass (scheduler.scheduler.SchedulerStats) is owned by scheduler/; this module
is the one place that knows its field names, so a rename there is a one-line change here.
It accepts the dataclass, any object with those attributes, or a dict of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Field names of scheduler.scheduler.SchedulerStats, with the alternatives seen in drafts;
# the first name present wins.
_PAGES_TOTAL = ("num_pages_total", "pages_total")
_PAGES_FREE = ("num_pages_free", "pages_free")
_PAGES_IN_USE = ("num_pages_in_use", "pages_in_use")  # excludes evictable cached pages
_PAGES_EVICTABLE = ("num_pages_cached_evictable", "pages_cached_evictable")
_PREFIX_QUERIES = ("prefix_cache_queries_tokens", "prefix_cache_queries")
_PREFIX_HITS = ("prefix_cache_hit_tokens", "prefix_cache_hits")


@dataclass(frozen=True)
class KVStatsSnapshot:
    """Pages of the KV pool and the prefix cache's running totals, at one instant."""

    pages_total: int | None = None
    pages_in_use: int | None = None  # held by requests; evictable cached pages count as free
    prefix_queries_tokens: int | None = None  # running total of prompt tokens looked up
    prefix_hit_tokens: int | None = None  # running total of those served from the cache

    @property
    def usage_fraction(self) -> float | None:
        if not self.pages_total or self.pages_in_use is None:
            return None
        return min(1.0, max(0.0, self.pages_in_use / self.pages_total))


def _field(stats: object, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
        if value is not None:
            return int(value)
    return None


def read_kv_stats(stats: object) -> KVStatsSnapshot:
    """Extract the KV and prefix-cache numbers from the scheduler's stats object.

    Pages that only the prefix cache holds (evictable) count as free, as in vLLM: they are
    reclaimed on demand, so they do not limit admission.
    """
    if stats is None:
        return KVStatsSnapshot()
    total = _field(stats, _PAGES_TOTAL)
    in_use = _field(stats, _PAGES_IN_USE)
    if in_use is None:
        free = _field(stats, _PAGES_FREE)
        if total is not None and free is not None:
            in_use = max(0, total - free - (_field(stats, _PAGES_EVICTABLE) or 0))
    return KVStatsSnapshot(
        pages_total=total,
        pages_in_use=in_use,
        prefix_queries_tokens=_field(stats, _PREFIX_QUERIES),
        prefix_hit_tokens=_field(stats, _PREFIX_HITS),
    )
