"""Workloads: exact lengths, shared prefixes, multi-turn histories, JSONL files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.protocols import SamplingOptions, build_body
from loadtest.runner import RunConfig, run_benchmark
from loadtest.workloads import WorkloadOptions, build_trace
from tests.loadtest.scripted_server import Script, ScriptedSSEServer


def _seed() -> int:
    return int(np.random.default_rng().integers(1 << 31))


def test_random_prompts_have_exact_lengths_within_the_range_ratio() -> None:
    opts = WorkloadOptions(name="random", num_prompts=300, input_len=200, output_len=40,
                           range_ratio=0.5, seed=_seed(), token_id_range=(1000, 30000))
    trace = build_trace(opts)
    turns = [c.turns[0] for c in trace.conversations]
    assert len(turns) == 300
    for t in turns:
        assert t.token_ids is not None and len(t.token_ids) == t.prompt_len
        assert 100 <= t.prompt_len <= 300 and 20 <= t.output_len <= 60
        assert min(t.token_ids) >= 1000 and max(t.token_ids) < 30000
    assert len({t.prompt_len for t in turns}) > 50  # really spread over the range
    again = build_trace(opts)
    assert [c.turns[0].token_ids for c in again.conversations] == [t.token_ids for t in turns]
    fixed = build_trace(WorkloadOptions(num_prompts=5, input_len=64, output_len=9))
    assert {len(c.turns[0].token_ids or []) for c in fixed.conversations} == {64}


def test_shared_prefix_groups_share_exactly_the_system_prompt() -> None:
    opts = WorkloadOptions(name="shared-prefix", num_groups=4, prompts_per_group=3,
                           system_prompt_len=50, question_len=7, output_len=5, seed=_seed(),
                           shared_prefix_order="grouped")
    trace = build_trace(opts)
    prompts = [c.turns[0].token_ids for c in trace.conversations]
    assert len(prompts) == 12 and all(p is not None and len(p) == 57 for p in prompts)
    groups = [prompts[i * 3:(i + 1) * 3] for i in range(4)]
    for group in groups:
        assert all(p[:50] == group[0][:50] for p in group)
        assert len({tuple(p[50:]) for p in group}) == 3
    assert len({tuple(g[0][:50]) for g in groups}) == 4


def test_shared_prefix_default_order_shuffles_the_groups_as_sglang_does() -> None:
    """SGLang's generated-shared-prefix shuffles all prompts after building them group by
    group; the default order does the same (seeded), 'grouped' keeps group after group."""
    base = dict(name="shared-prefix", num_groups=6, prompts_per_group=5, system_prompt_len=20,
                question_len=4, output_len=5, seed=_seed())
    grouped = build_trace(WorkloadOptions(**base, shared_prefix_order="grouped"))
    shuffled = build_trace(WorkloadOptions(**base))
    assert shuffled.options.describe()["shared_prefix_order"] == "random"
    ids = lambda t: [tuple(c.turns[0].token_ids or []) for c in t.conversations]  # noqa: E731
    assert sorted(ids(shuffled)) == sorted(ids(grouped))  # the same prompts...
    groups_in_order = [p[:20] for p in ids(shuffled)]
    # ...in another order, where a group's prompts do not all come one after another.
    changes = sum(a != b for a, b in zip(groups_in_order, groups_in_order[1:], strict=False))
    assert changes > 5
    assert ids(build_trace(WorkloadOptions(**base))) == ids(shuffled)  # seeded
    with pytest.raises(ValueError, match="order"):
        build_trace(WorkloadOptions(**base, shared_prefix_order="sorted"))


def test_multi_turn_sends_the_history_with_each_previous_answer() -> None:
    opts = WorkloadOptions(name="multi-turn", num_prompts=2, turns=3, input_len=6,
                           output_len=3, seed=_seed(), use_token_ids=False)
    trace = build_trace(opts)
    script = Script(ttft_s=0.005, gaps_s=[0.002, 0.002])  # answers " w0 w1 w2"
    with ScriptedSSEServer(script) as server:
        cfg = RunConfig(base_url=server.base_url, endpoint="chat", show_progress=False)
        result = asyncio.run(run_benchmark(cfg, trace))
        bodies = server.counters.bodies
    assert result["completed"] == 6
    for conv in trace.conversations:
        mine = [b for b in bodies if b["messages"][0]["content"] == conv.turns[0].text]
        assert [len(b["messages"]) for b in mine] == [1, 3, 5]  # in turn order
        last = mine[-1]["messages"]
        assert [m["role"] for m in last] == ["user", "assistant"] * 2 + ["user"]
        assert [m["content"] for m in last[::2]] == [t.text for t in conv.turns]
        assert last[1]["content"] == last[3]["content"] == " w0 w1 w2"


def test_file_workload_reads_text_and_token_id_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello there general", "output_len": 4},
            {"prompt": [5, 6, 7, 8, 9], "max_tokens": 2}, {"prompt": "x", "output_len": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    trace = build_trace(WorkloadOptions(name="file", file=str(path), num_prompts=2))
    turns = [c.turns[0] for c in trace.conversations]
    assert len(turns) == 2
    assert turns[0].text == "hello there general" and turns[0].output_len == 4
    assert turns[1].token_ids == [5, 6, 7, 8, 9] and turns[1].output_len == 2
    with pytest.raises(ValueError, match="tokenizer"):
        build_trace(WorkloadOptions(name="file", file=str(path), use_token_ids=False))


def test_request_bodies_per_endpoint() -> None:
    trace = build_trace(WorkloadOptions(num_prompts=1, input_len=5, output_len=7))
    turn = trace.conversations[0].turns[0]
    sampling = SamplingOptions()
    comp = build_body("completions", "m", turn, [], sampling)
    assert comp["prompt"] == turn.token_ids and comp["max_tokens"] == 7 and comp["stream"]
    assert comp["stream_options"] == {"include_usage": True} and comp["ignore_eos"] is True
    gen = build_body("generate", None, turn, [], sampling)
    assert gen["input_ids"] == turn.token_ids
    assert gen["sampling_params"]["max_tokens"] == 7 and "model" not in gen
    with pytest.raises(ValueError, match="text"):
        build_body("chat", "m", turn, [], sampling)
