"""The periodic stats line an operator reads in the log, as vLLM prints it: every
`interval_s` (10 s) while the engine has work, one INFO line with the running and waiting
requests, KV-cache use, prompt and generation throughput over the interval, and the prefix
cache's hit rate over the interval. Idle intervals print nothing (`--disable-log-stats`
turns it off). The engine calls `on_step` after every step and `flush_if_due` when it
falls idle, so the interval in which work ended still gets its line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from scheduler.config import SchedulerStats

logger = logging.getLogger("attnserve.stats")
DEFAULT_INTERVAL_S = 10.0


@dataclass
class _Totals:
    prompt_tokens: int = 0  # prompt tokens computed (cache hits excluded)
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0


class StatsLogger:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last_time = self._clock()
        self._last = _Totals()
        self._now = _Totals()
        self._stats: SchedulerStats | None = None
        self._active = False  # work seen since the last line
        self.last_line: str | None = None

    def on_step(self, prompt_tokens: int, generation_tokens: int, stats: SchedulerStats) -> None:
        """Totals after a step (prompt tokens computed and tokens generated, so far)."""
        self._now = _Totals(prompt_tokens, generation_tokens, stats.prefix_cache_queries_tokens,
                            stats.prefix_cache_hit_tokens)
        self._stats = stats
        self._active = True
        if self._clock() - self._last_time >= self.interval_s:
            self._log()

    def due_in(self) -> float | None:
        """Seconds until a pending line is due; None when nothing happened since the last."""
        if not self._active:
            return None
        return max(0.0, self.interval_s - (self._clock() - self._last_time))

    def flush_if_due(self) -> None:
        if self._active and self._clock() - self._last_time >= self.interval_s:
            self._log()

    def _log(self) -> None:
        now = self._clock()
        elapsed = max(now - self._last_time, 1e-9)
        cur, last, s = self._now, self._last, self._stats
        assert s is not None
        queries = cur.prefix_queries - last.prefix_queries
        hits = cur.prefix_hits - last.prefix_hits
        kv = s.num_pages_in_use / s.num_pages_total if s.num_pages_total else 0.0
        line = (
            f"engine stats: running {s.num_running} reqs, waiting {s.num_waiting} reqs, "
            f"KV cache {100 * kv:.1f}% used, "
            f"prompt {(cur.prompt_tokens - last.prompt_tokens) / elapsed:.1f} tokens/s, "
            f"generation {(cur.generation_tokens - last.generation_tokens) / elapsed:.1f} "
            f"tokens/s, prefix cache hit rate "
            + (f"{100 * hits / queries:.1f}%" if queries > 0 else "-")
        )
        logger.info("%s", line)
        self.last_line = line
        self._last, self._last_time = cur, now
        # a line with requests still in the engine keeps the next interval active
        self._active = bool(s.num_running or s.num_waiting)
