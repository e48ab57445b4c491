"""A fake model runner over a fake KV pool, and an independent check of the scheduler's state.

The fake pool maps a KV slot to the (token, position) that was computed into it. Each step the
runner checks that every scheduled sequence finds its whole prefix in its pages (so prefix
sharing, dedup, eviction and preemption kept the right K/V), writes its new tokens only into
pages that it alone owns, and samples a token that is a hash of what it read: a wrong page
changes the output, and the output of a request does not depend on how it was scheduled.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence

from scheduler.plan import StepPlan
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 0
VOCAB = 24  # small, so EOS (about 1 in 24 tokens) ends some requests early


def scheduler_config(**overrides: object) -> SchedulerConfig:
    """A configuration for tests: these values unless overridden."""
    values: dict[str, object] = dict(page_size=16, max_num_seqs=256, max_num_batched_tokens=2048,
                                     max_model_len=1024, enable_prefix_cache=True,
                                     schedule_policy="fcfs")
    return SchedulerConfig(**{**values, **overrides})  # type: ignore[arg-type]


def next_token(request_id: str, tokens: Sequence[int]) -> int:
    """The fake model: a deterministic function of the request and every token before."""
    data = request_id.encode() + b"|" + ",".join(map(str, tokens)).encode()
    return zlib.crc32(data) % VOCAB


def reference_output(req: Request, max_model_len: int) -> list[int]:
    """What the request generates when it runs alone: the oracle for any schedule."""
    sp = req.sampling
    tokens = list(req.prompt_token_ids)
    out: list[int] = []
    while True:
        tok = next_token(req.request_id, tokens)
        out.append(tok)
        tokens.append(tok)
        if (not sp.ignore_eos and tok in req.eos_token_ids) or tok in sp.stop_token_ids:
            return out
        if len(out) >= sp.max_tokens or len(tokens) >= max_model_len:
            return out


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.page_size = scheduler.page_size
        self.slots: dict[int, tuple[int, int]] = {}
        self.prefill_tokens = 0  # tokens of non-decode sequences computed, all steps

    def _slot(self, req: Request, pos: int) -> int:
        return req.pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def run(self, plan: StepPlan) -> list[int]:
        alloc = self.scheduler.allocator
        cache = self.scheduler.prefix_cache
        tree_pages = set(cache.all_pages()) if cache is not None else set()
        sampled = []
        for seq in plan.seqs:
            req = seq.request
            tokens = req.all_token_ids
            end = seq.start + seq.num_tokens
            assert req.status is RequestStatus.RUNNING
            assert seq.start == req.num_computed_tokens
            assert 0 < seq.num_tokens and end <= req.num_tokens
            assert len(req.pages) * self.page_size >= end, "pages do not cover the chunk"
            for pos in range(seq.start):
                assert self.slots.get(self._slot(req, pos)) == (tokens[pos], pos), (
                    f"{req.request_id}: wrong K/V at position {pos}"
                )
            for pos in range(seq.start, end):
                page = req.pages[pos // self.page_size]
                assert alloc.refcount(page) == 1 and page not in tree_pages, (
                    f"{req.request_id}: writes into shared page {page}"
                )
                self.slots[self._slot(req, pos)] = (tokens[pos], pos)
            if not seq.is_decode:
                self.prefill_tokens += seq.num_tokens
            if seq.needs_sample:
                sampled.append(next_token(req.request_id, tokens[:end]))
        return sampled


def check_plan(scheduler: Scheduler, plan: StepPlan) -> None:
    cfg = scheduler.config
    assert plan.num_tokens <= cfg.max_num_batched_tokens
    assert len(plan.seqs) <= cfg.max_num_seqs
    assert all(s.is_decode for s in plan.seqs[: plan.num_decodes])
    assert not any(s.is_decode for s in plan.seqs[plan.num_decodes :])
    assert len({id(s.request) for s in plan.seqs}) == len(plan.seqs)
    for req in plan.preempted:
        assert req.status is RequestStatus.WAITING and not req.pages
        assert all(s.request is not req for s in plan.seqs)


def check_state(scheduler: Scheduler) -> None:
    """Recount every page's owners from scratch and compare with the allocator."""
    alloc, cache, ps = scheduler.allocator, scheduler.prefix_cache, scheduler.page_size
    alloc.check_invariants()
    owners: Counter[int] = Counter()
    running_pages: set[int] = set()
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for req in scheduler.running:
        assert req.status is RequestStatus.RUNNING
        assert len(set(req.pages)) == len(req.pages) and 0 not in req.pages
        assert len(req.pages) * ps >= req.num_computed_tokens, "pages do not cover K/V"
        assert req.num_computed_tokens < req.num_tokens
        owners.update(req.pages)
        running_pages.update(req.pages)
    for req in scheduler.waiting:
        assert req.status is RequestStatus.WAITING
        assert not req.pages and req.num_computed_tokens == 0
    if cache is not None:
        cache.check_invariants()
        owners.update(cache.all_pages())
        for node in cache.nodes():
            if node.lock_ref == 0:  # evictable: no running request may use these pages
                assert not running_pages.intersection(node.pages), "evictable page in use"
    for page in range(1, alloc.num_pages):
        assert alloc.refcount(page) == owners[page], f"page {page}: refcount vs owners"
    stats = scheduler.stats
    assert stats.num_pages_free == alloc.num_total - len(owners)
    assert stats.num_pages_in_use == stats.num_pages_total - stats.num_pages_free - (
        stats.num_pages_cached_evictable
    )
    assert 0 <= stats.prefix_cache_hit_tokens <= stats.prefix_cache_queries_tokens


def run_to_completion(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000
) -> list[StepPlan]:
    plans = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return plans
        plan = scheduler.schedule()
        check_plan(scheduler, plan)
        scheduler.update(plan, runner.run(plan))
        check_state(scheduler)
        plans.append(plan)
    raise AssertionError("requests did not finish: the scheduler is stuck")
