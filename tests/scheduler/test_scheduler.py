"""Scheduler unit tests on designed workloads, with the fake runner of `sim.py`."""

from __future__ import annotations

import random

import pytest

from kvcache.allocator import PageAllocator
from kvcache.radix import RadixPrefixCache
from scheduler.plan import PLACEHOLDER_TOKEN
from scheduler.policy import MIN_IN_FLIGHT_SHARE_TOKENS
from scheduler.request import FinishReason, Request, RequestStatus, SamplingParams
from scheduler.scheduler import Scheduler
from tests.scheduler.sim import (
    EOS,
    VOCAB,
    FakeRunner,
    check_plan,
    check_state,
    reference_output,
    run_to_completion,
    scheduler_config,
)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def _request(rid: str, prompt: list[int], max_tokens: int = 8, **kw: object) -> Request:
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=bool(kw.pop("ignore_eos", True)))
    for name, value in kw.items():
        setattr(sampling, name, value)
    return Request(rid, list(prompt), sampling, eos_token_ids=frozenset({EOS}))


def _scheduler(num_pages: int = 256, **kw: object) -> tuple[Scheduler, FakeRunner]:
    config = scheduler_config(**kw)
    scheduler = Scheduler(config, PageAllocator(num_pages))
    return scheduler, FakeRunner(scheduler)


def _step(scheduler: Scheduler, runner: FakeRunner):
    plan = scheduler.schedule()
    check_plan(scheduler, plan)
    finished = scheduler.update(plan, runner.run(plan))
    check_state(scheduler)
    return plan, finished


def test_chunked_prefill_respects_the_token_budget() -> None:
    rng = random.Random(1)
    scheduler, runner = _scheduler(page_size=16, max_num_batched_tokens=32)
    req = _request("a", _tokens(rng, 100), max_tokens=3)
    scheduler.add_request(req)
    chunks = []
    while scheduler.has_unfinished():
        plan, _ = _step(scheduler, runner)
        assert plan.num_tokens <= 32
        chunks.append([(s.start, s.num_tokens) for s in plan.seqs])
    assert chunks == [[(0, 32)], [(32, 32)], [(64, 32)], [(96, 4)], [(100, 1)], [(101, 1)]]
    assert req.output_token_ids == reference_output(req, 1024)


def test_decodes_come_first_and_are_reserved_in_the_budget() -> None:
    rng = random.Random(2)
    scheduler, runner = _scheduler(page_size=4, max_num_batched_tokens=16)
    a, b = _request("a", _tokens(rng, 5), max_tokens=20), _request("b", _tokens(rng, 5))
    scheduler.add_request(a)
    scheduler.add_request(b)
    _step(scheduler, runner)  # both prompts in one step
    c = _request("c", _tokens(rng, 40))
    scheduler.add_request(c)
    plan, _ = _step(scheduler, runner)
    assert plan.num_decodes == 2
    assert [s.request.request_id for s in plan.seqs] == ["a", "b", "c"]
    assert [s.num_tokens for s in plan.seqs] == [1, 1, 14]
    # c is mid-prefill and older than nothing; a and b still get their decode token first
    plan, _ = _step(scheduler, runner)
    assert [(s.request.request_id, s.num_tokens) for s in plan.seqs] == [
        ("a", 1), ("b", 1), ("c", 14)
    ]


def test_max_num_seqs_is_honoured() -> None:
    rng = random.Random(3)
    scheduler, runner = _scheduler(page_size=4, max_num_seqs=2, max_num_batched_tokens=512)
    reqs = [_request(f"r{i}", _tokens(rng, 6), max_tokens=4) for i in range(5)]
    for req in reqs:
        scheduler.add_request(req)
    plans = run_to_completion(scheduler, runner)
    assert max(len(p.seqs) for p in plans) == 2
    assert all(r.output_token_ids == reference_output(r, 1024) for r in reqs)


def test_fcfs_admits_in_arrival_order() -> None:
    rng = random.Random(4)
    scheduler, runner = _scheduler(page_size=4, max_num_batched_tokens=10, max_num_seqs=8)
    reqs = [_request(f"r{i}", _tokens(rng, 10), max_tokens=2) for i in range(4)]
    for req in reqs:
        scheduler.add_request(req)
    admitted: list[str] = []
    while scheduler.has_unfinished():
        plan, _ = _step(scheduler, runner)
        admitted += [s.request.request_id for s in plan.seqs if s.start == 0]
    assert admitted == ["r0", "r1", "r2", "r3"]


def _warm_cache(scheduler: Scheduler, runner: FakeRunner, prompt: list[int]) -> None:
    scheduler.add_request(_request("warm", prompt, max_tokens=1))
    run_to_completion(scheduler, runner)


@pytest.mark.parametrize("policy, first", [("fcfs", "cold"), ("lpm", "hot")])
def test_lpm_admits_the_longest_cached_prefix_first(policy: str, first: str) -> None:
    rng = random.Random(5)
    scheduler, runner = _scheduler(
        page_size=4, max_num_batched_tokens=40, schedule_policy=policy
    )
    shared = _tokens(rng, 32)
    _warm_cache(scheduler, runner, shared)
    cold = _request("cold", _tokens(rng, 36))
    hot = _request("hot", shared + _tokens(rng, 4))
    scheduler.add_request(cold)
    scheduler.add_request(hot)
    plan, _ = _step(scheduler, runner)
    # 40 tokens of budget: the cold prompt fills it, the hot one needs 8 after its 32 hits
    assert plan.seqs[0].request.request_id == first
    if policy == "lpm":
        assert [(s.request.request_id, s.start) for s in plan.seqs] == [("hot", 32), ("cold", 0)]
    run_to_completion(scheduler, runner)
    assert hot.num_cached_tokens == 32


def test_preemption_picks_the_most_recently_admitted_and_requeues_it_first() -> None:
    rng = random.Random(6)
    # 3 requests of 8 prompt tokens, page size 4: 2 pages each to start, 6 pages at the end
    scheduler, runner = _scheduler(num_pages=1 + 8, page_size=4, enable_prefix_cache=False)
    reqs = [_request(f"r{i}", _tokens(rng, 8), max_tokens=16) for i in range(3)]
    late = _request("late", _tokens(rng, 4), max_tokens=2)
    for req in reqs:
        scheduler.add_request(req)
    _step(scheduler, runner)
    assert [r.request_id for r in scheduler.running] == ["r0", "r1", "r2"]
    scheduler.add_request(late)  # waits behind everything: no pages for it
    preempted: list[Request] = []
    while not preempted:
        plan, _ = _step(scheduler, runner)
        preempted = plan.preempted
    assert [r.request_id for r in preempted] == ["r2"]
    victim = preempted[0]
    assert list(scheduler.waiting)[:2] == [victim, late]
    assert victim.num_computed_tokens == 0 and victim.output_token_ids
    assert victim.num_preemptions == 1 and scheduler.stats.num_preemptions_total >= 1
    run_to_completion(scheduler, runner)
    for req in [*reqs, late]:
        assert req.output_token_ids == reference_output(req, 1024)
    assert scheduler.allocator.num_free == scheduler.allocator.num_total


def test_preempted_request_reuses_its_cached_pages() -> None:
    rng = random.Random(7)
    scheduler, runner = _scheduler(num_pages=1 + 8, page_size=4)
    reqs = [_request(f"r{i}", _tokens(rng, 8), max_tokens=16) for i in range(3)]
    for req in reqs:
        scheduler.add_request(req)
    run_to_completion(scheduler, runner)
    assert scheduler.num_preemptions_total >= 1
    assert any(r.num_preemptions and r.num_cached_tokens > 0 for r in reqs)
    for req in reqs:
        assert req.output_token_ids == reference_output(req, 1024)


@pytest.mark.parametrize("page_size, hit", [(16, 192), (1, 200)])
def test_exact_hits_for_a_shared_system_prompt(page_size: int, hit: int) -> None:
    rng = random.Random(8)
    scheduler, runner = _scheduler(num_pages=4096, page_size=page_size)
    system = _tokens(rng, 200)
    questions = [[i + 1] + _tokens(rng, 20 + 3 * i) for i in range(8)]  # distinct first token
    reqs = [_request(f"q{i}", system + q, max_tokens=8) for i, q in enumerate(questions)]
    scheduler.add_request(reqs[0])
    run_to_completion(scheduler, runner)
    computed_first = runner.prefill_tokens
    for req in reqs[1:]:
        scheduler.add_request(req)
    run_to_completion(scheduler, runner)
    stats = scheduler.stats
    assert stats.prefix_cache_hit_tokens == 7 * hit
    assert stats.prefix_cache_queries_tokens == sum(r.num_prompt_tokens for r in reqs)
    assert [r.num_cached_tokens for r in reqs] == [0] + [hit] * 7
    assert runner.prefill_tokens - computed_first == sum(
        r.num_prompt_tokens - hit for r in reqs[1:]
    )
    for req in reqs:
        assert req.output_token_ids == reference_output(req, 1024)


@pytest.mark.parametrize("budget", [512, 24])
def test_requests_arriving_together_compute_their_common_prefix_once(budget: int) -> None:
    rng = random.Random(9)
    scheduler, runner = _scheduler(page_size=16, max_num_batched_tokens=budget)
    system = _tokens(rng, 64)
    reqs = [_request(f"r{i}", system + [i + 1] + _tokens(rng, 9), max_tokens=4) for i in range(4)]
    for req in reqs:
        scheduler.add_request(req)
    run_to_completion(scheduler, runner)
    assert [r.num_cached_tokens for r in reqs] == [0, 64, 64, 64]
    assert runner.prefill_tokens == 74 + 3 * 10
    assert scheduler.stats.prefix_cache_hit_tokens == 3 * 64
    for req in reqs:
        assert req.output_token_ids == reference_output(req, 1024)


def test_without_prefix_cache_everything_is_computed() -> None:
    rng = random.Random(9)
    scheduler, runner = _scheduler(page_size=16, enable_prefix_cache=False)
    system = _tokens(rng, 64)
    reqs = [_request(f"r{i}", system + [i + 1] + _tokens(rng, 9), max_tokens=4) for i in range(4)]
    for req in reqs:
        scheduler.add_request(req)
    run_to_completion(scheduler, runner)
    assert scheduler.prefix_cache is None
    assert runner.prefill_tokens == 4 * 74
    stats = scheduler.stats
    assert stats.prefix_cache_hit_tokens == stats.prefix_cache_queries_tokens == 0
    assert stats.num_pages_free == stats.num_pages_total


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_fully_cached_prompt_still_computes_its_last_token(page_size: int) -> None:
    rng = random.Random(10)
    scheduler, runner = _scheduler(page_size=page_size)
    prompt = _tokens(rng, 12)
    first = _request("first", prompt, max_tokens=1)
    scheduler.add_request(first)
    run_to_completion(scheduler, runner)
    again = _request("again", prompt, max_tokens=3)
    scheduler.add_request(again)
    plan = scheduler.schedule()
    [seq] = plan.seqs
    assert seq.start == again.num_cached_tokens == 11 // page_size * page_size
    assert seq.start + seq.num_tokens == 12 and seq.needs_sample
    scheduler.update(plan, runner.run(plan))  # the runner asserts it writes no shared page
    check_state(scheduler)
    run_to_completion(scheduler, runner)
    assert again.output_token_ids == reference_output(again, 1024)


def test_a_request_id_in_use_is_refused() -> None:
    scheduler, _ = _scheduler()
    scheduler.add_request(_request("same", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(_request("same", [2]))
    assert scheduler.num_waiting == 1


def test_stop_conditions() -> None:
    rng = random.Random(11)
    scheduler, runner = _scheduler(page_size=4)
    prompt = _tokens(rng, 6)
    solo = reference_output(_request("x", prompt, max_tokens=30), 1024)
    eos_req = _request("x", prompt, max_tokens=30, ignore_eos=False)
    eos_req.eos_token_ids = frozenset({solo[4]})
    stop_req = _request("y", prompt, max_tokens=30)
    stop_req.sampling.stop_token_ids = [reference_output(stop_req, 1024)[2]]
    ignore_req = _request("z", prompt, max_tokens=5, ignore_eos=True)
    ignore_req.eos_token_ids = frozenset(reference_output(ignore_req, 1024)[:4])
    for req in (eos_req, stop_req, ignore_req):
        scheduler.add_request(req)
    run_to_completion(scheduler, runner)
    assert eos_req.finish_reason is FinishReason.STOP
    assert eos_req.output_token_ids == solo[: solo.index(solo[4]) + 1]
    stop_solo = reference_output(_request("y", prompt, max_tokens=30), 1024)
    assert stop_req.finish_reason is FinishReason.STOP
    assert stop_req.output_token_ids == stop_solo[: stop_solo.index(stop_solo[2]) + 1]
    assert ignore_req.finish_reason is FinishReason.LENGTH
    assert len(ignore_req.output_token_ids) == 5
    for req in (eos_req, stop_req, ignore_req):
        assert req.first_token_time is not None and req.finished_time is not None


def test_abort_at_any_point_frees_everything() -> None:
    rng = random.Random(12)
    scheduler, runner = _scheduler(page_size=4, max_num_batched_tokens=8)
    waiting = _request("waiting", _tokens(rng, 30))
    prefilling = _request("prefilling", _tokens(rng, 30))
    decoding = _request("decoding", _tokens(rng, 3), max_tokens=50)
    scheduler.add_request(decoding)
    _step(scheduler, runner)
    scheduler.add_request(prefilling)
    scheduler.add_request(waiting)
    _step(scheduler, runner)
    assert prefilling.status is RequestStatus.RUNNING and 0 < prefilling.num_computed_tokens < 30
    assert waiting.status is RequestStatus.WAITING
    for req in (waiting, prefilling, decoding):
        assert scheduler.abort_request(req.request_id)
        assert req.finish_reason is FinishReason.ABORT and not req.pages
        check_state(scheduler)
    assert not scheduler.abort_request("decoding") and not scheduler.abort_request("nope")
    assert not scheduler.has_unfinished()
    scheduler.prefix_cache.clear()
    assert scheduler.allocator.num_free == scheduler.allocator.num_total


def test_abort_between_schedule_and_update() -> None:
    rng = random.Random(13)
    scheduler, runner = _scheduler(page_size=4)
    a, b = _request("a", _tokens(rng, 9)), _request("b", _tokens(rng, 9))
    scheduler.add_request(a)
    scheduler.add_request(b)
    plan = scheduler.schedule()
    sampled = runner.run(plan)
    scheduler.finish_request("a", FinishReason.ABORT)
    finished = scheduler.update(plan, sampled)
    assert finished == [] and a.output_token_ids == [] and len(b.output_token_ids) == 1
    check_state(scheduler)
    with pytest.raises(ValueError, match="sampled tokens"):
        scheduler.update(scheduler.schedule(), [])


def test_eviction_spares_pages_of_running_requests() -> None:
    rng = random.Random(14)
    scheduler, runner = _scheduler(num_pages=1 + 12, page_size=4)
    shared, stale = _tokens(rng, 16), _tokens(rng, 16)
    _warm_cache(scheduler, runner, shared)
    _warm_cache(scheduler, runner, stale)
    assert scheduler.stats.num_pages_cached_evictable == 8
    user = _request("user", shared + _tokens(rng, 4), max_tokens=8)
    scheduler.add_request(user)
    _step(scheduler, runner)
    shared_pages = user.pages[:4]
    assert scheduler.prefix_cache.match(shared).pages == shared_pages
    scheduler.prefix_cache.match(stale)  # least recently used now: the shared prefix
    hog = _request("hog", _tokens(rng, 20), max_tokens=4)
    scheduler.add_request(hog)
    while scheduler.has_unfinished():
        _step(scheduler, runner)
        if user.status is RequestStatus.RUNNING:
            assert all(scheduler.allocator.refcount(p) == 2 for p in shared_pages)
    assert scheduler.prefix_cache.match_len(shared) == 16  # the locked prefix survived
    assert scheduler.prefix_cache.match_len(stale) < 16  # the stale one made room
    assert hog.output_token_ids == reference_output(hog, 1024)
    assert user.output_token_ids == reference_output(user, 1024)


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_short_common_header_does_not_hold_requests_back(page_size: int) -> None:
    rng = random.Random(15)
    scheduler, runner = _scheduler(page_size=page_size)
    header = _tokens(rng, MIN_IN_FLIGHT_SHARE_TOKENS - 1)  # like a chat template's preamble
    reqs = [_request(f"r{i}", header + [i + 1] + _tokens(rng, 40)) for i in range(3)]
    for req in reqs:
        scheduler.add_request(req)
    plan, _ = _step(scheduler, runner)
    assert [s.request.request_id for s in plan.seqs] == ["r0", "r1", "r2"]
    run_to_completion(scheduler, runner)
    assert all(r.output_token_ids == reference_output(r, 1024) for r in reqs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("schedule_policy", "sjf", "unknown schedule policy 'sjf'"),
        ("page_size", 0, "page_size"),
        ("max_num_seqs", 0, "max_num_seqs"),
        ("max_num_batched_tokens", 0, "max_num_batched_tokens"),
        ("max_model_len", 1, "max_model_len"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scheduler_config(**{field: value})


def test_prefix_cache_must_share_the_allocator() -> None:
    alloc = PageAllocator(8)
    with pytest.raises(ValueError, match="allocator"):
        Scheduler(scheduler_config(page_size=4), alloc, RadixPrefixCache(PageAllocator(8), 4))
    with pytest.raises(ValueError, match="page size"):
        Scheduler(scheduler_config(page_size=4), alloc, RadixPrefixCache(alloc, 2))
    off = Scheduler(scheduler_config(page_size=4, enable_prefix_cache=False), alloc)
    assert off.prefix_cache is None


def test_prefill_tokens_are_bounded_while_decodes_run() -> None:
    rng = random.Random(31)
    scheduler, runner = _scheduler(page_size=4, max_num_batched_tokens=64,
                                   max_prefill_tokens_with_decode=8)
    a = _request("a", _tokens(rng, 40), max_tokens=30)
    scheduler.add_request(a)
    plan, _ = _step(scheduler, runner)  # nothing decodes yet: the whole budget
    assert [s.num_tokens for s in plan.seqs] == [40]
    b, c = _request("b", _tokens(rng, 20)), _request("c", _tokens(rng, 5))
    scheduler.add_request(b)
    scheduler.add_request(c)
    chunks = []
    while b.num_computed_tokens < 20 or c.num_computed_tokens < 5:
        plan, _ = _step(scheduler, runner)
        assert plan.seqs[0].request is a and plan.num_decodes >= 1
        chunks.append([(s.request.request_id, s.num_tokens) for s in plan.seqs[plan.num_decodes:]])
    assert chunks == [[("b", 8)], [("b", 8)], [("b", 4), ("c", 4)], [("c", 1)]]
    while scheduler.has_unfinished():
        _step(scheduler, runner)
    for req in (a, b, c):
        assert req.output_token_ids == reference_output(req, 1024)


def test_advance_then_resolve_is_update_and_eos_on_the_last_token_is_a_stop() -> None:
    """Overlap scheduling applies a step before its tokens are known (advance: placeholders,
    length limits), then resolves them; EOS sampled as the last allowed token still ends the
    request with `stop`, as `update` decides it."""
    rng = random.Random(32)
    scheduler, runner = _scheduler(page_size=4)
    req = _request("a", _tokens(rng, 6), max_tokens=2, ignore_eos=False)
    other = _request("b", _tokens(rng, 6), max_tokens=3, ignore_eos=False)
    scheduler.add_request(req)
    scheduler.add_request(other)
    plan = scheduler.schedule()
    pending = scheduler.advance(plan)
    assert req.output_token_ids == [PLACEHOLDER_TOKEN] and pending.finished == []
    assert scheduler.resolve(pending, [5, 6]) == []
    assert req.output_token_ids == [5] and other.output_token_ids == [6]
    plan = scheduler.schedule()
    pending = scheduler.advance(plan)
    assert pending.finished == [req] and req.finish_reason is FinishReason.LENGTH
    assert req.status is RequestStatus.FINISHED  # its pages are back already
    finished = scheduler.resolve(pending, [EOS, EOS])
    assert finished == [req, other]
    assert req.finish_reason is FinishReason.STOP and other.finish_reason is FinishReason.STOP
    assert req.output_token_ids == [5, EOS] and other.output_token_ids == [6, EOS]
    assert not scheduler.has_unfinished()
