"""Scheduler settings and its statistics record. Pure Python.

The settings have no defaults here: the engine passes every one (its defaults live in
server/engine/config.py, the one place for them).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.policy import SCHEDULE_POLICIES


@dataclass
class SchedulerConfig:
    page_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int  # prompt + generated tokens, at most
    enable_prefix_cache: bool
    schedule_policy: str
    vocab_size: int | None = None  # prompt token ids must be below it; None: unchecked
    # Prefill tokens one step may hold while decodes run in it (None: max_num_batched_tokens):
    # bounds how long a prefill chunk stalls the running streams (docs/architecture.md)
    max_prefill_tokens_with_decode: int | None = None
    # hybrid models with the prefix cache: keep the recurrent state every this many tokens
    # (a multiple of the page size); 0: no snapshots
    state_snapshot_interval: int = 0

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        cap = self.max_prefill_tokens_with_decode
        if cap is not None and cap < 1:
            raise ValueError("max_prefill_tokens_with_decode must be >= 1")
        n = self.state_snapshot_interval
        if n < 0 or n % self.page_size:
            raise ValueError(f"state_snapshot_interval ({n}) must be a multiple of the page "
                             f"size ({self.page_size})")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"unknown schedule policy {self.schedule_policy!r}; "
                f"choose one of {SCHEDULE_POLICIES}"
            )


@dataclass
class SchedulerStats:
    """A snapshot of the pool and running totals (counters only grow)."""

    num_pages_total: int  # the scratch page excluded
    num_pages_free: int
    num_pages_cached: int  # in the prefix cache, locked or not
    num_pages_cached_evictable: int  # in the prefix cache and used by no running request
    num_pages_in_use: int  # total - free - cached_evictable
    # Tokens of every admission's prompt (a preempted request's re-admission counts again,
    # its generated tokens included), and how many of them the cache served. 0 when off.
    prefix_cache_queries_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions_total: int
    num_running: int
    num_waiting: int
    # hybrid models (0 otherwise): state slots, those held by the prefix cache's snapshots
    num_state_slots_total: int = 0
    num_state_slots_free: int = 0
    num_state_snapshots: int = 0
