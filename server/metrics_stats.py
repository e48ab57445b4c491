"""Reads the scheduler's stats object into the few numbers the metrics need.

The scheduler's stats dataclass is owned by scheduler/; this module is the one place that
knows its field names, so a rename there is a one-line change here. It accepts a
dataclass, any object with attributes, or a dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Accepted spellings of each field, first match wins.
_PAGES_TOTAL = ("num_pages_total", "pages_total", "total_pages", "num_total_pages")
_PAGES_FREE = ("num_pages_free", "pages_free", "free_pages", "num_free_pages")
_PAGES_IN_USE = ("num_pages_in_use", "pages_in_use", "used_pages", "num_pages_used", "pages_used")
_PAGES_EVICTABLE = (
    "num_pages_cached_evictable", "pages_cached_evictable", "num_pages_evictable",
    "pages_evictable", "evictable_pages", "num_evictable_pages", "num_cached_evictable_pages",
)
_PREFIX_QUERIES = (
    "prefix_cache_queries_tokens", "prefix_cache_queries", "prefix_cache_query_tokens",
    "prefix_queries_tokens",
)
_PREFIX_HITS = (
    "prefix_cache_hit_tokens", "prefix_cache_hits_tokens", "prefix_cache_hits", "prefix_hit_tokens",
)


@dataclass(frozen=True)
class KVStatsSnapshot:
    """Pages of the KV pool and the prefix cache's running totals, at one instant."""

    pages_total: int | None = None
    pages_in_use: int | None = None  # held by running or waiting requests, not evictable cache
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
    free = _field(stats, _PAGES_FREE)
    in_use = _field(stats, _PAGES_IN_USE)
    evictable = _field(stats, _PAGES_EVICTABLE) or 0
    if in_use is None and total is not None and free is not None:
        in_use = total - free
    if in_use is not None:
        in_use = max(0, in_use - evictable)
    return KVStatsSnapshot(
        pages_total=total,
        pages_in_use=in_use,
        prefix_queries_tokens=_field(stats, _PREFIX_QUERIES),
        prefix_hit_tokens=_field(stats, _PREFIX_HITS),
    )
