"""Scheduler settings, its statistics record, and the rejection error. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.policy import SCHEDULE_POLICIES


class RequestRejected(ValueError):
    """A request that can never be served; the message is meant for the user."""


@dataclass
class SchedulerConfig:
    page_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_prefix_cache: bool = True
    schedule_policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
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
