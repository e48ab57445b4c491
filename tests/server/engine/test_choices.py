"""server/engine/choices.py without a model: engine requests and their parameters, choice
indices of n samples over several prompts, and best_of's ranking by cumulative logprob."""

from __future__ import annotations

from scheduler.request import SamplingParams
from server.engine.choices import ChoiceGroup
from server.engine.outputs import RequestOutput, TokenLogprob


def _out(rid: str, tokens: list[int], lps: list[float], finished: bool,
         error: str | None = None) -> RequestOutput:
    return RequestOutput(
        request_id=rid, new_token_ids=tokens, new_text="".join(f"<{t}>" for t in tokens),
        finished=finished, finish_reason="length" if finished else None, num_prompt_tokens=3,
        num_output_tokens=len(tokens), new_logprobs=[TokenLogprob(t, lp) for t, lp in
                                                     zip(tokens, lps, strict=True)],
        error=error,
    )


def test_n_samples_of_two_prompts() -> None:
    group = ChoiceGroup("cmpl-x", 2, SamplingParams(n=3, seed=10, temperature=0.7))
    assert group.request_ids == [f"cmpl-x-{k}" for k in range(6)]
    assert group.num_choices == 6
    assert group.expand_prompts([[1], [2]]) == [[1]] * 3 + [[2]] * 3
    params = group.engine_params()
    assert [p.seed for p in params] == [10, 11, 12, 10, 11, 12]
    assert all(p.n == 1 and p.best_of is None and p.logprobs is None for p in params)
    out = _out("cmpl-x-4", [7], [-0.5], False)
    assert group.add(4, out) == [(4, out)]  # streamed through: choice 4 = prompt 1, sample 1


def test_one_prompt_one_sample_keeps_the_request_id() -> None:
    group = ChoiceGroup("gen-1", 1, SamplingParams())
    assert group.request_ids == ["gen-1"] and group.engine_params()[0].seed is None


def test_best_of_ranks_finished_candidates_by_cumulative_logprob() -> None:
    group = ChoiceGroup("c", 2, SamplingParams(n=2, best_of=3, temperature=1.0))
    assert group.num_choices == 4 and len(group.request_ids) == 6
    assert all(p.logprobs == 0 for p in group.engine_params())  # computed for the ranking
    # prompt 0: candidates 0 (sum -3), 1 (sum -1), 2 (sum -2), delivered in pieces
    assert group.add(0, _out("c-0", [1], [-1.0], False)) == []
    assert group.add(1, _out("c-1", [4, 5], [-0.5, -0.5], True)) == []
    assert group.add(0, _out("c-0", [2], [-2.0], True)) == []
    # prompt 1 finishes in between, one candidate failed: it ranks last
    assert group.add(3, _out("c-3", [9], [-9.0], True)) == []
    assert group.add(4, _out("c-4", [8], [0.0], True, error="boom")) == []
    prompt1 = group.add(5, _out("c-5", [6], [-4.0], True))
    assert [(i, o.new_token_ids) for i, o in prompt1] == [(2, [6]), (3, [9])]
    prompt0 = group.add(2, _out("c-2", [3], [-2.0], True))
    assert [(i, o.new_token_ids) for i, o in prompt0] == [(0, [4, 5]), (1, [3])]
    assert all(o.finished and o.new_logprobs == [] for _, o in prompt0)  # not asked for
    merged = dict(prompt0)[0]
    assert merged.new_text == "<4><5>" and merged.num_output_tokens == 2


def test_best_of_returns_logprobs_when_asked() -> None:
    group = ChoiceGroup("c", 1, SamplingParams(n=1, best_of=2, temperature=1.0, logprobs=2))
    assert all(p.logprobs == 2 for p in group.engine_params())
    group.add(0, _out("c-0", [1, 2], [-0.1, -0.2], True))
    (index, best), = group.add(1, _out("c-1", [3], [-5.0], True))
    assert index == 0 and [lp.logprob for lp in best.new_logprobs] == [-0.1, -0.2]


def test_async_engine_streams_choices_of_n_and_best_of() -> None:
    import asyncio

    from server.engine import AsyncEngine
    from tests.server.engine_fixtures import make_llm

    core = make_llm().engine

    async def run(params: SamplingParams) -> tuple[int, dict[int, list[RequestOutput]]]:
        engine = AsyncEngine(lambda: core, max_queued_requests=16)
        engine.start()
        try:
            assert engine.wait_ready(60)
            got: dict[int, list[RequestOutput]] = {}
            async with engine.submit([[1, 2, 3], [4, 5, 6, 7]], params, "req") as stream:
                async for index, out in stream:
                    got.setdefault(index, []).append(out)
            return stream.num_choices, got
        finally:
            engine.shutdown()

    base = dict(temperature=1.0, max_tokens=3, ignore_eos=True, seed=3)
    num, got = asyncio.run(run(SamplingParams(n=2, **base)))  # type: ignore[arg-type]
    assert num == 4 and sorted(got) == [0, 1, 2, 3]
    assert all(len(outs) == 3 and outs[-1].finished for outs in got.values())  # streamed
    assert got[1][0].request_id == "req-1" and got[2][0].num_prompt_tokens == 4
    num, got = asyncio.run(run(SamplingParams(n=1, best_of=3, **base)))  # type: ignore[arg-type]
    assert num == 2 and sorted(got) == [0, 1]
    assert all(len(outs) == 1 and len(outs[0].new_token_ids) == 3 for outs in got.values())
