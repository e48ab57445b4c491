"""Continuous batching over a paged KV cache with a radix prefix cache.

Each step (`schedule`) mixes one decode token for every running request that has finished
its prompt with prefill chunks, under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`). Prefill is always chunked: a long prompt takes as many steps
as the budget needs. When pages run out, unlocked prefix-cache pages are evicted first; then
the most recently admitted running request is preempted by recompute: its computed pages go
into the prefix cache, it returns to the head of the waiting queue, and on re-admission its
prompt plus the tokens it had generated are prefilled again (mostly from the cache).

Invariants kept between calls:
- every page in `request.pages` carries one allocator reference owned by that request;
- a running request locks the tree path of its computed prefix, so eviction never takes a
  page a running request uses;
- `request.pages` is in position order and covers `num_computed_tokens` tokens; while a
  request runs it only grows (preemption empties it).
Hybrid models (linear-attention layers, `state_slots` given): a running request also holds
one state slot, taken at admission with its pages and freed with them; admission waits when
no slot can be freed. With the prefix cache, each prefill chunk also takes a slot for every
snapshot point (a multiple of `state_snapshot_interval`) it crosses, and the tree keeps
those snapshots; a new request resumes from the deepest snapshot its prompt matches
(`RadixPrefixCache.match_state`), restored into its own slot before the step.
Pure Python: no torch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence

from kvcache.allocator import PageAllocator
from kvcache.radix import MatchResult, RadixNode, RadixPrefixCache
from kvcache.state_slots import StateSlotAllocator
from scheduler.config import SchedulerConfig, SchedulerStats
from scheduler.plan import PLACEHOLDER_TOKEN, PendingTokens, ScheduledSeq, StepPlan
from scheduler.policy import MIN_IN_FLIGHT_SHARE_TOKENS, admission_order, common_prefix_pages
from scheduler.request import FinishReason, Request, RequestStatus, SamplingParams
from scheduler.validation import check_request

logger = logging.getLogger(__name__)

# Re-exported: the engine imports these from here.
__all__ = ["Scheduler", "SchedulerConfig", "SchedulerStats"]


def _pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class Scheduler:
    """Owns the requests' state; shares `allocator` (and the cache) with the engine.

    The prefix cache is used when `config.enable_prefix_cache` is on: `prefix_cache` if given
    (it must sit on the same allocator), else a new one. With the flag off it is None.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: PageAllocator,
        prefix_cache: RadixPrefixCache | None = None,
        state_slots: StateSlotAllocator | None = None,
    ) -> None:
        self.config = config
        self.page_size = config.page_size
        self.allocator = allocator
        self.state_slots = state_slots
        self.prefix_cache: RadixPrefixCache | None = None
        if config.enable_prefix_cache:
            if prefix_cache is None:
                prefix_cache = RadixPrefixCache(allocator, config.page_size, state_slots)
            if prefix_cache.allocator is not allocator:
                raise ValueError("the prefix cache must use the scheduler's allocator")
            if prefix_cache.state_slots is not state_slots:
                raise ValueError("the prefix cache must use the scheduler's state slots")
            if state_slots is not None and config.state_snapshot_interval <= 0:
                raise ValueError("a hybrid model's prefix cache needs state snapshots "
                                 "(state_snapshot_interval > 0)")
            if prefix_cache.page_size != config.page_size:
                raise ValueError("the prefix cache's page size differs from the scheduler's")
            self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the next victim
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._locked_node: dict[str, RadixNode] = {}  # request id -> its lock in the tree
        self._cached_pages: dict[str, int] = {}  # request id -> its pages already in the tree
        self.prefix_cache_queries_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self.num_preemptions_total = 0
        self._prefill_left = 0  # prefill tokens the step being scheduled may still take
        # hybrid models: snapshot slots a scheduled chunk writes, by request id and token
        # count, until the tree takes them (`_cache_prefix`)
        self._pending_snapshots: dict[str, dict[int, int]] = {}
        self._state_cached: dict[str, int] = {}  # request id -> its tokens a snapshot covers
        self.snapshot_every = config.state_snapshot_interval \
            if state_slots is not None and self.prefix_cache is not None else 0

    # -- public state ----------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def stats(self) -> SchedulerStats:
        total = self.allocator.num_total
        free = self.allocator.num_free
        cache = self.prefix_cache
        evictable = cache.num_evictable_pages if cache is not None else 0
        return SchedulerStats(
            num_pages_total=total,
            num_pages_free=free,
            num_pages_cached=cache.num_cached_pages if cache is not None else 0,
            num_pages_cached_evictable=evictable,
            num_pages_in_use=total - free - evictable,
            prefix_cache_queries_tokens=self.prefix_cache_queries_tokens,
            prefix_cache_hit_tokens=self.prefix_cache_hit_tokens,
            num_preemptions_total=self.num_preemptions_total,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_state_slots_total=self.state_slots.num_total if self.state_slots else 0,
            num_state_slots_free=self.state_slots.num_free if self.state_slots else 0,
            num_state_snapshots=cache.num_snapshots if cache is not None else 0,
        )

    # -- submission and cancellation -------------------------------------------------------

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestRejected for a request that can never run (scheduler/validation.py).

        Reads only fixed limits, so any thread may call it."""
        check_request(
            prompt_token_ids, params, max_model_len=self.config.max_model_len,
            kv_capacity_tokens=self.allocator.num_total * self.page_size,
            vocab_size=self.config.vocab_size,
        )

    def add_request(self, req: Request) -> None:
        """Queue a request that passed `validate`."""
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        req.status = RequestStatus.WAITING
        self._requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """End a request wherever it is (e.g. a stop string the engine found); frees its pages.

        Unknown or already finished ids are ignored.
        """
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, reason)

    def abort_request(self, request_id: str) -> bool:
        """Abort at any point; returns False if the request is unknown or already finished."""
        if request_id not in self._requests:
            return False
        self.finish_request(request_id, FinishReason.ABORT)
        return True

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        cap = self.config.max_prefill_tokens_with_decode
        with_decodes = cap is not None and any(self._is_decode_ready(r) for r in self.running)
        self._prefill_left = cap if with_decodes else self.config.max_num_batched_tokens
        budget = self._schedule_running(plan, decodes, prefills)
        # After a preemption the pool is tight: admitting now would only thrash.
        if not plan.preempted:
            self._admit_waiting(budget, decodes, prefills)
        plan.seqs = decodes + prefills
        plan.num_decodes = len(decodes)
        return plan

    def _schedule_running(
        self, plan: StepPlan, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq]
    ) -> int:
        """Give every running request its next token(s); returns the token budget left."""
        budget = self.config.max_num_batched_tokens
        # Preemption only removes from the end, so index i keeps naming the same request.
        decode_ready = [self._is_decode_ready(r) for r in self.running]
        # Decode tokens are reserved up front so prefill chunks of older requests cannot
        # starve newer requests' decodes.
        pending_decodes = sum(decode_ready)
        # One eviction for every decode that crosses into a new page, rather than one each.
        ps = self.page_size
        self._make_free(
            sum(1 for r in self.running if r.num_computed_tokens == len(r.pages) * ps)
        )
        i = 0
        while i < len(self.running):
            req = self.running[i]
            is_decode = decode_ready[i]
            if is_decode:
                pending_decodes -= 1
                num_new = 1 if budget >= 1 else 0
            else:
                remaining = req.num_tokens - req.num_computed_tokens
                num_new = min(remaining, budget - pending_decodes, self._prefill_left)
            if num_new <= 0:
                i += 1
                continue
            need = _pages_for(req.num_computed_tokens + num_new, ps) - len(req.pages)
            if need > 0:
                while not self._make_free(need):
                    victim = self.running[-1]
                    if victim is not req and decode_ready[len(self.running) - 1]:
                        pending_decodes -= 1
                    self._preempt(victim, plan)
                    if victim is req:
                        return budget  # it was the last running request
                req.pages.extend(self.allocator.alloc(need))
            seq = ScheduledSeq(req, req.num_computed_tokens, num_new)
            if not is_decode:
                self._take_snapshot_slots(seq)
            (decodes if is_decode else prefills).append(seq)
            budget -= num_new
            if not is_decode:
                self._prefill_left -= num_new
            i += 1
        return budget

    def _admit_waiting(
        self, budget: int, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq]
    ) -> None:
        cfg = self.config
        cache = self.prefix_cache
        if not self.waiting or budget <= 0 or len(self.running) >= cfg.max_num_seqs:
            return
        for req in admission_order(self.waiting, cfg.schedule_policy, cache):
            if min(budget, self._prefill_left) <= 0 or len(self.running) >= cfg.max_num_seqs:
                return
            tokens = req.all_token_ids
            match: MatchResult | None = None
            # Prompt logprobs need every prompt position's logits: no cached prefix (vLLM).
            if cache is not None and req.sampling.prompt_logprobs is None:
                # The last token is always computed: its logits are needed, and so it never
                # writes into a page that the tree shares.
                match = cache.match_state(tokens[:-1]) if self.state_slots is not None \
                    else cache.match(tokens[:-1])
                if self._prefix_in_flight(tokens, match.num_tokens):
                    continue
                cache.lock(match.node)
            cached_pages = match.pages if match is not None else []
            num_cached = match.num_tokens if match is not None else 0
            num_new = min(len(tokens) - num_cached, budget, self._prefill_left)
            need = _pages_for(num_cached + num_new, self.page_size) - len(cached_pages)
            if not self._make_free(need) or not self._make_free_slot():
                if cache is not None and match is not None:
                    cache.unlock(match.node)
                return  # head-of-line: later requests wait too, so large ones do not starve
            self.waiting.remove(req)
            self.allocator.incref(cached_pages)
            req.pages = list(cached_pages) + self.allocator.alloc(need)
            req.num_computed_tokens = req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            if match is not None:
                self._locked_node[req.request_id] = match.node
                self._cached_pages[req.request_id] = len(match.pages)
                self.prefix_cache_queries_tokens += len(tokens)
                self.prefix_cache_hit_tokens += num_cached
            self.running.append(req)
            seq = ScheduledSeq(req, num_cached, num_new)
            if self.state_slots is not None:
                req.state_slot = self.state_slots.alloc()
                snapshot = match.snapshot if match is not None else None
                seq.state_source = -1 if snapshot is None else snapshot
                self._state_cached[req.request_id] = num_cached
                self._take_snapshot_slots(seq)
            # A preempted request whose cache hit covers all but its last token re-enters
            # as a plain decode.
            (decodes if seq.is_decode else prefills).append(seq)
            budget -= num_new
            self._prefill_left -= num_new

    def _prefix_in_flight(self, tokens: list[int], num_cached: int) -> bool:
        """True if a request still prefilling will compute at least MIN_IN_FLIGHT_SHARE_TOKENS
        more of `tokens`' prefix than the cache holds now: admitting later shares those pages
        instead of computing them twice.
        """
        ps = self.page_size
        reusable = (len(tokens) - 1) // ps  # whole pages a later match could return
        worth = num_cached + MIN_IN_FLIGHT_SHARE_TOKENS
        if reusable * ps < worth:
            return False
        head = tokens[: reusable * ps]
        for other in self.running:
            if self._is_decode_ready(other):
                continue  # decoding: its prompt is already in the tree
            if common_prefix_pages(head, other.all_token_ids, ps) * ps >= worth:
                return True
        return False

    # -- results ---------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: list[int]) -> list[Request]:
        """Apply one step's results; returns the requests that finished in it.

        `sampled[i]` is the token for the i-th seq of `plan.seqs` that needs a sample.
        """
        expected = sum(1 for seq in plan.seqs if seq.needs_sample)
        if len(sampled) != expected:
            raise ValueError(f"update got {len(sampled)} sampled tokens, expected {expected}")
        return self.resolve(self.advance(plan), sampled)

    def advance(self, plan: StepPlan) -> PendingTokens:
        """The half of `update` that needs no token values, for a step whose tokens are still
        on the device (overlap scheduling): the chunks count as computed, each sampled request
        gets PLACEHOLDER_TOKEN as its next output token, and requests that reach max_tokens
        or max_model_len finish now. `resolve` fills in the tokens."""
        pending = PendingTokens()
        for seq in plan.seqs:
            needs_sample = seq.needs_sample  # read before the request advances
            req = seq.request
            if req.status is not RequestStatus.RUNNING:  # aborted or finished since schedule()
                if needs_sample:
                    pending.slots.append(None)
                continue
            req.num_computed_tokens = seq.start + seq.num_tokens
            if not seq.is_decode and self.prefix_cache is not None:
                self._cache_prefix(req)
            if not needs_sample:
                continue
            req.output_token_ids.append(PLACEHOLDER_TOKEN)
            pending.slots.append((req, len(req.output_token_ids) - 1))
            if self._length_reached(req):
                self._finish(req, FinishReason.LENGTH)
                pending.finished.append(req)
        return pending

    def resolve(self, pending: PendingTokens, sampled: list[int]) -> list[Request]:
        """Put a step's sampled tokens in place of its placeholders and end the requests they
        stop (EOS, stop ids); returns every request the step finished. A request may have
        been preempted or finished since `advance`: its token is still recorded."""
        if len(sampled) != len(pending.slots):
            raise ValueError(f"resolve got {len(sampled)} tokens for {len(pending.slots)} samples")
        finished = list(pending.finished)
        on_length = {id(r) for r in pending.finished}
        now = time.monotonic()
        for slot, token in zip(pending.slots, sampled, strict=True):
            if slot is None:
                continue
            req, index = slot
            req.output_token_ids[index] = token
            if req.first_token_time is None:
                req.first_token_time = now
            if not self._stops_on(req, token, index + 1):
                continue
            if id(req) in on_length:  # EOS on the last allowed token: a stop, as before
                req.finish_reason = FinishReason.STOP
            elif req.status in (RequestStatus.RUNNING, RequestStatus.WAITING):
                self._finish(req, FinishReason.STOP)
                finished.append(req)
        return finished

    @staticmethod
    def _stops_on(req: Request, token: int, num_output: int) -> bool:
        """Does `token`, the request's `num_output`-th, end it (EOS or a stop id)? Under
        min_tokens the sampler never draws those (the engine bans them); should one come
        anyway it does not end the request before min_tokens."""
        sp = req.sampling
        if num_output <= sp.min_tokens:
            return False
        return (not sp.ignore_eos and token in req.eos_token_ids) or token in sp.stop_token_ids

    def _length_reached(self, req: Request) -> bool:
        return (len(req.output_token_ids) >= req.sampling.max_tokens
                or req.num_tokens >= self.config.max_model_len)

    # -- pages -----------------------------------------------------------------------------

    @staticmethod
    def _is_decode_ready(req: Request) -> bool:
        return bool(req.output_token_ids) and req.num_tokens - req.num_computed_tokens == 1

    def _make_free(self, num_pages: int) -> bool:
        """Evict unlocked cache pages until `num_pages` are free, if that is possible."""
        short = num_pages - self.allocator.num_free
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(short)
        return self.allocator.num_free >= num_pages

    def _make_free_slot(self) -> bool:
        """Hybrid models: make one state slot free (evicting snapshots), if possible."""
        slots = self.state_slots
        if slots is None:
            return True
        if slots.num_free == 0 and self.prefix_cache is not None:
            self.prefix_cache.evict_snapshots(1)
        return slots.num_free > 0

    def _take_snapshot_slots(self, seq: ScheduledSeq) -> None:
        """A slot for each snapshot point the chunk crosses (-1 where none can be freed)."""
        every = self.snapshot_every
        if every <= 0 or self.state_slots is None:
            return
        first = seq.start // every + 1
        last = (seq.start + seq.num_tokens) // every
        pending = self._pending_snapshots.setdefault(seq.request.request_id, {})
        for j in range(first, last + 1):
            slot = self.state_slots.alloc() if self._make_free_slot() else -1
            seq.snapshot_slots.append(slot)
            if slot >= 0:
                pending[j * every] = slot

    def _cache_prefix(self, req: Request) -> None:
        """Put the request's computed whole pages into the tree and lock them for it.

        Where the tree already holds the same tokens (another request computed them at the
        same time), the tree keeps its page and the request keeps its own copy until it
        releases its pages: `request.pages` of a running request never changes in place, so
        a block table built from it in an earlier step stays valid.
        """
        cache = self.prefix_cache
        assert cache is not None
        num_pages = req.num_computed_tokens // self.page_size
        if self.state_slots is not None:
            num_pages = self._pages_with_state(req, num_pages)
        tokens = req.all_token_ids[: num_pages * self.page_size]
        if num_pages > self._cached_pages.get(req.request_id, 0):
            self._insert_pages(req, tokens, num_pages)
        self._hand_over_snapshots(req, tokens)

    def _pages_with_state(self, req: Request, num_pages: int) -> int:
        """Hybrid models: of the request's first `num_pages` computed pages, those up to its
        deepest state snapshot. Pages past it are of no use to a later request (it could not
        resume there), and caching them would pin duplicates: a request that resumes at an
        earlier snapshot recomputes those positions into pages of its own."""
        limit = num_pages * self.page_size
        pending = self._pending_snapshots.get(req.request_id, {})
        deepest = max([self._state_cached.get(req.request_id, 0),
                       *(n for n in pending if n <= limit)])
        self._state_cached[req.request_id] = deepest
        return deepest // self.page_size

    def _hand_over_snapshots(self, req: Request, tokens: list[int]) -> None:
        """The tree takes the request's computed snapshots (those within `tokens`)."""
        pending = self._pending_snapshots.get(req.request_id)
        if not pending:
            return
        done = {n: slot for n, slot in pending.items() if n <= len(tokens)}
        for n in done:
            del pending[n]
        if done:
            assert self.prefix_cache is not None
            self.prefix_cache.add_snapshots(tokens, done)

    def _insert_pages(self, req: Request, tokens: list[int], num_pages: int) -> None:
        cache = self.prefix_cache
        assert cache is not None
        result = cache.insert(tokens, req.pages[:num_pages])
        cache.lock(result.node)
        old = self._locked_node.get(req.request_id)
        if old is not None:
            cache.unlock(old)
        self._locked_node[req.request_id] = result.node
        self._cached_pages[req.request_id] = num_pages

    def _release_pages(self, req: Request) -> None:
        """Drop the request's pages and lock; computed whole pages stay in the cache."""
        if self.prefix_cache is not None and req.pages:
            self._cache_prefix(req)
        node = self._locked_node.pop(req.request_id, None)
        if node is not None and self.prefix_cache is not None:
            self.prefix_cache.unlock(node)
        self._cached_pages.pop(req.request_id, None)
        self._state_cached.pop(req.request_id, None)
        self.allocator.decref(req.pages)
        req.pages = []
        # snapshots past what was computed (a chunk still in flight, or never run)
        for slot in self._pending_snapshots.pop(req.request_id, {}).values():
            assert self.state_slots is not None
            self.state_slots.free(slot)
        if req.state_slot is not None:
            assert self.state_slots is not None
            self.state_slots.free(req.state_slot)
            req.state_slot = None

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self._release_pages(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)
        plan.preempted.append(req)
        logger.debug("preempted %s (%d tokens)", req.request_id, req.num_tokens)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._release_pages(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.finished_time = time.monotonic()
        self._requests.pop(req.request_id, None)
