"""Hypothesis drives the scheduler of a hybrid model (state slots beside the pages, state
snapshots in the prefix cache) with random arrivals, shared prefixes, aborts (before a step
and between its run and its update), few pages (preemption) and few state slots.

A fake state pool tracks what each slot holds: the token prefix whose recurrent state it
is. Every step checks that each scheduled sequence's slot holds exactly its computed prefix
(after a restore from a snapshot or a reset to zeros), writes the snapshots at the points it
crosses, and samples from the prefix it read. After every step the slots are recounted
from scratch: each used slot belongs to one running request, one snapshot in the tree or one
snapshot a chunk is still writing, so nothing leaks; at the end, once the cache is cleared,
every slot and page is free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.allocator import PageAllocator
from kvcache.state_slots import StateSlotAllocator
from scheduler.plan import StepPlan
from scheduler.request import Request, RequestStatus, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.validation import RequestRejected
from tests.scheduler.sim import EOS, VOCAB, FakeRunner, check_plan, check_state

MAX_MODEL_LEN = 160


class FakeStates(FakeRunner):
    """FakeRunner's K/V checks, plus a fake state pool: slot -> the tokens folded into it."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.states: dict[int, tuple[int, ...]] = {}

    def run(self, plan: StepPlan) -> list[int]:
        every = self.scheduler.snapshot_every
        for seq in plan.seqs:
            req = seq.request
            slot = req.state_slot
            assert slot is not None and slot > 0, f"{req.request_id} runs without a state slot"
            if seq.state_source is not None:
                src = seq.state_source
                self.states[slot] = () if src < 0 else self.states[src]
            tokens = tuple(req.all_token_ids)
            assert self.states[slot] == tokens[: seq.start], (
                f"{req.request_id}: its state slot holds the wrong prefix")
            end = seq.start + seq.num_tokens
            # decodes keep no snapshots: only prefill chunks (the extend op) write them
            crossed = [n for n in range(every, end + 1, every) if n > seq.start] \
                if every and not seq.is_decode else []
            assert len(seq.snapshot_slots) == len(crossed)
            for n, snap in zip(crossed, seq.snapshot_slots, strict=True):
                if snap >= 0:
                    self.states[snap] = tokens[:n]
            self.states[slot] = tokens[:end]
        return super().run(plan)

    def check_restores(self) -> None:
        """Every snapshot in the tree holds the state of the tokens up to its node's end."""
        cache = self.scheduler.prefix_cache
        if cache is None:
            return
        for node in cache.nodes():
            if node.snapshot is None:
                continue
            path, n = [], node
            while n is not None and not n.is_root:
                path = n.key + path
                n = n.parent
            assert self.states[node.snapshot] == tuple(path), "a snapshot holds another prefix"


def check_slots(scheduler: Scheduler) -> None:
    """Recount every state slot's owner from scratch."""
    slots = scheduler.state_slots
    assert slots is not None
    slots.check_invariants()
    owners: list[int] = []
    for req in scheduler.running:
        assert req.state_slot is not None
        owners.append(req.state_slot)
    for req in scheduler.waiting:
        assert req.state_slot is None
    cache = scheduler.prefix_cache
    if cache is not None:
        owners.extend(n.snapshot for n in cache.nodes() if n.snapshot is not None)
    for pending in scheduler._pending_snapshots.values():
        owners.extend(pending.values())
    assert len(owners) == len(set(owners)), "a state slot has two owners"
    assert sorted(owners) == [s for s in range(1, slots.num_slots) if slots.is_used(s)], \
        "a used state slot has no owner (leaked), or an owner holds a free slot"


@dataclass(eq=False)
class Arrival:
    request: Request
    step: int
    abort_step: int | None
    abort_mid_step: int | None


@st.composite
def workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, int, int, list[Arrival]]:
    page_size = draw(st.sampled_from([1, 4, 16]))
    prefix_cache = draw(st.sampled_from([True, True, False]))
    config = SchedulerConfig(
        page_size=page_size,
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(8, 64) | st.integers(128, 256)),
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_cache=prefix_cache,
        schedule_policy=draw(st.sampled_from(["fcfs", "lpm"])),
        state_snapshot_interval=draw(st.sampled_from([16, 32])) if prefix_cache else 0,
    )
    biggest = -(-(MAX_MODEL_LEN - 1) // page_size)
    num_pages = 1 + draw(st.integers(biggest // 2, biggest) | st.integers(biggest, 3 * biggest))
    num_slots = 1 + draw(st.integers(1, 8))
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    event_rate = draw(st.sampled_from([0.0, 0.1, 0.3]))
    spread = draw(st.integers(0, 12))

    def token() -> int:
        return rng.randrange(1, VOCAB)

    prefixes = [[token() for _ in range(rng.randrange(20, 90))] for _ in range(rng.randrange(1, 3))]
    arrivals = []
    for i in range(draw(st.integers(3, 12))):
        prefix = rng.choice(prefixes)
        prompt = prefix[: rng.randrange(len(prefix) + 1)] + [token() for _ in range(rng.randrange(1, 30))]
        sampling = SamplingParams(max_tokens=rng.randrange(1, 20), ignore_eos=rng.random() < 0.5)
        step = rng.randrange(spread + 1)

        def later(step: int = step) -> int | None:
            return step + rng.randrange(20) if rng.random() < event_rate else None

        request = Request(f"r{i}", prompt, sampling, eos_token_ids=frozenset({EOS}))
        arrivals.append(Arrival(request, step, later(), later()))
    return config, num_pages, num_slots, arrivals


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_state_slots_and_snapshots_never_leak(
    workload: tuple[SchedulerConfig, int, int, list[Arrival]],
) -> None:
    config, num_pages, num_slots, arrivals = workload
    scheduler = Scheduler(config, PageAllocator(num_pages), state_slots=StateSlotAllocator(num_slots))
    runner = FakeStates(scheduler)
    accepted: list[Arrival] = []
    last = max(a.step for a in arrivals)
    step = 0
    while step <= last or scheduler.has_unfinished():
        assert step < 3000, "the scheduler is stuck"
        for a in arrivals:
            if a.step == step:
                try:
                    scheduler.validate(a.request.prompt_token_ids, a.request.sampling)
                except RequestRejected:
                    continue
                scheduler.add_request(a.request)
                accepted.append(a)
            if a.abort_step == step and a in accepted:
                scheduler.abort_request(a.request.request_id)
        plan = scheduler.schedule()
        check_plan(scheduler, plan)
        sampled = runner.run(plan)
        for a in accepted:
            if a.abort_mid_step == step:
                scheduler.abort_request(a.request.request_id)
        scheduler.update(plan, sampled)
        check_state(scheduler)
        check_slots(scheduler)
        runner.check_restores()
        step += 1
    for a in accepted:
        assert a.request.status is RequestStatus.FINISHED and a.request.state_slot is None
    if scheduler.prefix_cache is not None:
        scheduler.prefix_cache.clear()
    slots = scheduler.state_slots
    assert slots is not None and slots.num_free == slots.num_total
    assert scheduler.allocator.num_free == scheduler.allocator.num_total
