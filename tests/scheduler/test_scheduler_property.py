"""Hypothesis drives scheduler + allocator + prefix cache with random workloads.

Random arrivals, prompt lengths, shared prefixes, aborts (before a step and between a step's
run and its update), engine-side stops, and a pool small enough to force eviction and
preemption. After every step `check_state` recounts page ownership from scratch; the fake
runner checks the K/V of every scheduled sequence. At the end every request has produced a
prefix of what it generates alone (all of it unless stopped early), and once the cache is
cleared every page is free.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.allocator import PageAllocator
from scheduler.request import FinishReason, Request, RequestStatus, SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.validation import RequestRejected
from tests.scheduler.sim import EOS, VOCAB, FakeRunner, check_plan, check_state, reference_output

MAX_MODEL_LEN = 96


@dataclass(eq=False)
class Arrival:
    request: Request
    step: int
    abort_step: int | None  # abort before this step's schedule()
    abort_mid_step: int | None  # abort between this step's run and update()
    stop_step: int | None  # the engine finishes it (a stop string) after this step's update


@st.composite
def workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, int, list[Arrival]]:
    """Hypothesis draws the configuration and the workload's shape; a seeded generator
    fills in the tokens and timings, which gives far more varied workloads per example
    than drawing every token (the seed is part of the reported failing example)."""
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    config = SchedulerConfig(
        page_size=page_size,
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 48) | st.integers(64, 256)),
        max_model_len=MAX_MODEL_LEN,
        enable_prefix_cache=draw(st.sampled_from([True, True, False])),
        schedule_policy=draw(st.sampled_from(["fcfs", "lpm"])),
    )
    biggest = -(-(MAX_MODEL_LEN - 1) // page_size)  # pages of the longest acceptable request
    # Now and then smaller than one maximal request, so some submissions are rejected.
    num_pages = 1 + draw(st.integers(biggest // 2, biggest - 1) | st.integers(biggest, 2 * biggest))
    num_requests = draw(st.integers(3, 16))
    arrival_spread = draw(st.integers(0, 12))  # 0: all arrive at once
    event_rate = draw(st.sampled_from([0.0, 0.1, 0.3]))  # aborts and engine-side stops
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))

    def token() -> int:
        return rng.randrange(1, VOCAB)

    prefixes = [[token() for _ in range(rng.randrange(65))] for _ in range(rng.randrange(1, 4))]
    arrivals = []
    for i in range(num_requests):
        prefix = rng.choice(prefixes)
        if rng.random() < 0.3:  # usually the whole shared prefix (a system prompt)
            prefix = prefix[: rng.randrange(len(prefix) + 1)]
        prompt = prefix + [token() for _ in range(rng.randrange(0 if prefix else 1, 21))]
        sampling = SamplingParams(
            max_tokens=rng.randrange(1, 25),
            ignore_eos=rng.random() < 0.5,
            stop_token_ids=[token()] if rng.random() < 0.3 else [],
        )
        step = rng.randrange(arrival_spread + 1)

        def maybe_later(step: int = step) -> int | None:
            return step + rng.randrange(31) if rng.random() < event_rate else None

        request = Request(f"r{i}", prompt, sampling, eos_token_ids=frozenset({EOS}))
        arrivals.append(Arrival(request, step, maybe_later(), maybe_later(), maybe_later()))
    return config, num_pages, arrivals


def _expect_rejection(config: SchedulerConfig, num_pages: int, req: Request) -> bool:
    total = req.num_prompt_tokens + req.sampling.max_tokens
    pages = -(-(total - 1) // config.page_size)
    return total > config.max_model_len or pages > num_pages - 1


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_invariant(
    workload: tuple[SchedulerConfig, int, list[Arrival]],
) -> None:
    config, num_pages, arrivals = workload
    scheduler = Scheduler(config, PageAllocator(num_pages))
    runner = FakeRunner(scheduler)
    accepted: list[Arrival] = []
    outputs: dict[Arrival, list[int]] = {}
    tables: dict[Arrival, tuple[int, list[int]]] = {}
    last_arrival = max(a.step for a in arrivals)
    step = 0
    while step <= last_arrival or scheduler.has_unfinished():
        assert step < 3000, "the scheduler is stuck"
        for a in arrivals:
            if a.step == step:
                try:
                    scheduler.validate(a.request.prompt_token_ids, a.request.sampling)
                    scheduler.add_request(a.request)
                    accepted.append(a)
                except RequestRejected:
                    assert _expect_rejection(config, num_pages, a.request)
                else:
                    assert not _expect_rejection(config, num_pages, a.request)
            if a.abort_step == step and a in accepted:
                was_live = not a.request.is_finished
                assert scheduler.abort_request(a.request.request_id) is was_live
        plan = scheduler.schedule()
        check_plan(scheduler, plan)
        sampled = runner.run(plan)
        for a in accepted:
            if a.abort_mid_step == step:
                scheduler.abort_request(a.request.request_id)
        finished = scheduler.update(plan, sampled)
        assert all(r.is_finished for r in finished)
        for a in accepted:
            if a.stop_step == step and not a.request.is_finished:
                scheduler.finish_request(a.request.request_id, FinishReason.STOP)
        check_state(scheduler)
        for a in accepted:
            req = a.request
            # generated tokens are never lost, preempted or not
            assert req.output_token_ids[: len(outputs.get(a, []))] == outputs.get(a, [])
            outputs[a] = list(req.output_token_ids)
            # a running request's block table only grows: the runner may keep it across steps
            old = tables.get(a)
            if old is not None and req.status is RequestStatus.RUNNING and old[0] == (
                req.num_preemptions
            ):
                assert req.pages[: len(old[1])] == old[1]
            tables[a] = (req.num_preemptions, list(req.pages))
        step += 1

    stats = scheduler.stats
    assert stats.num_running == stats.num_waiting == 0
    if not config.enable_prefix_cache:
        assert stats.prefix_cache_queries_tokens == 0 and stats.num_pages_cached == 0
    for a in accepted:
        req = a.request
        assert req.status is RequestStatus.FINISHED and not req.pages
        expected = reference_output(req, config.max_model_len)
        if req.finish_reason in (FinishReason.ABORT, FinishReason.STOP) and (
            req.output_token_ids != expected
        ):
            # cut short by an abort or an engine-side stop: a prefix of the solo run
            assert req.output_token_ids == expected[: len(req.output_token_ids)]
            assert a.abort_step is not None or a.abort_mid_step is not None or (
                a.stop_step is not None
            )
        else:
            assert req.output_token_ids == expected
    if scheduler.prefix_cache is not None:
        scheduler.prefix_cache.clear()
        assert scheduler.prefix_cache.num_cached_pages == 0
    scheduler.allocator.check_invariants()
    assert scheduler.allocator.num_free == scheduler.allocator.num_total
