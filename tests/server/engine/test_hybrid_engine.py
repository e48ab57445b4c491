"""Tiny random MiniMax-Text-01 models (lightning + softmax layers) served by the engine give
transformers' greedy tokens (float32, CPU): prefix cache on and off, chunked prefill on and
off, pages of 1 and 16 tokens, under preemption and with few state slots; a prompt that
extends a cached prefix resumes from the deepest state snapshot and computes only the rest."""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

import pytest
import torch

from model.loader import LoadedModel, embedded_tokenizer, load_model
from scheduler.request import SamplingParams
from server.engine import LLM, EngineConfig, EngineCore
from tests.model.minimax_tiny import VOCAB, save_tiny

NEW_TOKENS = 10
SEED = 20261206
SNAPSHOT_EVERY = 64


@functools.cache
def tiny(variant: str) -> tuple[str, torch.nn.Module]:
    folder = Path(tempfile.mkdtemp(prefix=f"attnserve-minimax-{variant}-"))
    hf = save_tiny(variant, folder, SEED)
    return str(folder), hf


@functools.cache
def prompts() -> list[list[int]]:
    """Ragged prompts, three of them sharing a 90-token prefix (past one snapshot point)."""
    rng = random.Random(SEED)
    shared = [rng.randrange(3, VOCAB) for _ in range(90)]
    own = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 17, 70, 130)]
    return own + [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 9, 40)]


def hf_generate(variant: str, ids: list[int], new_tokens: int) -> tuple[int, ...]:
    _, hf = tiny(variant)
    eos = sorted(embedded_tokenizer().eos_token_ids)
    with torch.inference_mode():
        gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])
    return tuple(gen[0, len(ids):].tolist())


@functools.cache
def hf_greedy(variant: str) -> tuple[tuple[int, ...], ...]:
    return tuple(hf_generate(variant, ids, NEW_TOKENS) for ids in prompts())


@functools.cache
def loaded_model(variant: str) -> LoadedModel:
    folder, _ = tiny(variant)
    loaded = load_model(folder, torch.float32, torch.device("cpu"), with_tokenizer=False)
    loaded.tokenizer = embedded_tokenizer()
    return loaded


def make_llm(variant: str, **overrides: object) -> LLM:
    folder, _ = tiny(variant)
    config = EngineConfig(model=folder, device="cpu", dtype="float32", kv_cache_tokens=2048,
                          state_snapshot_interval=SNAPSHOT_EVERY)
    for k, v in overrides.items():
        setattr(config, k, v)
    llm = LLM.__new__(LLM)
    llm.engine = EngineCore(config, loaded=loaded_model(variant))
    llm.tokenizer = llm.engine.tokenizer
    return llm


def check_released(llm: LLM) -> None:
    """Nothing held once every request ended: pages and state slots free but the cache's."""
    stats = llm.engine.stats()
    assert stats["num_pages_in_use"] == 0
    assert stats["num_state_slots_free"] + stats["num_state_snapshots"] == \
        stats["num_state_slots_total"]
    if llm.engine.prefix_cache is not None:
        llm.engine.prefix_cache.check_invariants()
        llm.engine.reset_prefix_cache()
    assert llm.engine.state_slots is not None
    assert llm.engine.state_slots.num_free == llm.engine.state_slots.num_total
    assert llm.engine.allocator.num_free == llm.engine.allocator.num_total


@pytest.mark.parametrize("variant", ["alternating", "three-to-one"])
@pytest.mark.parametrize(("layout", "page_size"), [("token", 1), ("nhd", 16)])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_greedy_matches_transformers(variant: str, layout: str, page_size: int, chunked: bool,
                                     prefix_cache: bool) -> None:
    llm = make_llm(variant, kv_layout=layout, page_size=page_size,
                   max_num_batched_tokens=48 if chunked else 4096,
                   enable_prefix_cache=prefix_cache)
    results = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for i, (r, want) in enumerate(zip(results, hf_greedy(variant), strict=True)):
        assert tuple(r.token_ids) == want, f"prompt {i}: ours {r.token_ids} != transformers {want}"
    hits = llm.engine.stats()["prefix_cache_hit_tokens"]
    # the shared prefix's snapshot at 64 tokens serves the later sharers
    assert hits == (2 * SNAPSHOT_EVERY if prefix_cache else 0)
    check_released(llm)


def test_extending_a_cached_prefix_computes_only_the_rest() -> None:
    """A conversation's second turn: its prompt extends the first turn's prompt and output.
    It resumes from the deepest snapshot (192 of its 231 tokens) and prefills 39 tokens; its
    tokens equal transformers' and a cache-off engine's."""
    rng = random.Random(7)
    first = [rng.randrange(3, VOCAB) for _ in range(200)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm = make_llm("three-to-one", kv_layout="nhd", page_size=16)
    [turn1] = llm.generate([first], params)
    second = first + list(turn1.token_ids) + [rng.randrange(3, VOCAB) for _ in range(21)]
    assert len(second) == 231
    before = llm.engine.prefill_tokens_computed
    snapshots_before = llm.engine.stats()["num_state_snapshots"]
    [turn2] = llm.generate([second], params)
    assert turn2.num_cached_tokens == 192
    assert llm.engine.prefill_tokens_computed - before == 231 - 192
    assert snapshots_before == 3  # 64, 128 and 192 tokens of the first prompt
    assert tuple(turn2.token_ids) == hf_generate("three-to-one", second, NEW_TOKENS)
    off = make_llm("three-to-one", kv_layout="nhd", page_size=16, enable_prefix_cache=False)
    assert off.generate([second], params)[0].token_ids == turn2.token_ids
    check_released(llm)


def test_preemption_and_few_state_slots_keep_the_tokens() -> None:
    """Six prompts decoding 40 tokens each: a pool of eight 16-token pages preempts, and two
    state slots hold admission to two requests at a time (snapshots evicted for them); the
    tokens equal those of a roomy engine."""
    rng = random.Random(SEED)
    short = [[rng.randrange(3, VOCAB) for _ in range(10 + 20 * (i % 3))] for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = make_llm("alternating", kv_layout="nhd", page_size=16)
    want = [r.token_ids for r in roomy.generate(short, params)]
    tight = make_llm("alternating", kv_layout="nhd", page_size=16, kv_cache_tokens=128,
                     enable_prefix_cache=False)
    assert [r.token_ids for r in tight.generate(short, params)] == want
    assert tight.engine.scheduler.stats.num_preemptions_total > 0
    check_released(tight)
    few = make_llm("alternating", kv_layout="nhd", page_size=16, state_slots=2)
    assert [r.token_ids for r in few.generate(short, params)] == want
    assert few.engine.stats()["num_state_slots_total"] == 2
    check_released(few)


def test_hybrid_flags_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        make_llm("alternating", state_snapshot_interval=48, page_size=16)


def test_triton_lightning_kernels_serve_the_same_tokens() -> None:
    """The Triton extend (with snapshots) and decode kernels, under the interpreter, give
    transformers' greedy tokens, and the prefix cache's restores work with them."""
    llm = make_llm("alternating", kv_layout="nhd", page_size=16, max_num_batched_tokens=48,
                   linear_attention_backend="triton")
    assert llm.engine.backend.linear.name == "triton"
    results = llm.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for i, (r, want) in enumerate(zip(results, hf_greedy("alternating"), strict=True)):
        assert tuple(r.token_ids) == want, f"prompt {i}: ours {r.token_ids} != transformers {want}"
    assert llm.engine.stats()["prefix_cache_hit_tokens"] == 2 * SNAPSHOT_EVERY
    check_released(llm)


def test_warm_up_builds_the_snapshot_kernels_on_the_scratch_slot() -> None:
    """The lightning backend's warm-up runs the extend op with one and two snapshot points on
    the scratch slot (the instances a serving step would otherwise build) and leaves every
    state zero."""
    llm = make_llm("alternating", kv_layout="nhd", page_size=16,
                   linear_attention_backend="triton")
    linear = llm.engine.backend.linear
    calls: list[int] = []
    inner = linear._extend

    def counting(*args, **kwargs):
        snaps = args[10]
        calls.append(0 if snaps is None else snaps.shape[1])
        return inner(*args, **kwargs)

    linear._extend = counting
    llm.engine.backend.warm_up()
    assert calls == [1, 2]
    assert not llm.engine.state_pool.states.any()


@pytest.mark.parametrize("capture_at_start", [True, False])
def test_decode_graphs_stage_each_rows_state_slot(capture_at_start: bool) -> None:
    """Decode steps of a hybrid model replay captured graphs: the graphs stage every row's
    state slot (padding rows: the scratch slot) and split the replay's attention time by
    kind. A CPU stand-in replays the forward pass on the graph's static buffers (as
    tests/model/test_cuda_graphs.py does); the tokens stay transformers'. Graphs captured
    while serving run their capture's eager pass on the scratch slot, so no state takes
    its token twice."""
    from model.attention_timing import step_timer
    from model.cuda_graphs import DecodeGraphs, _Captured

    replays = []

    class StandIn(DecodeGraphs):
        def _capture(self, bucket: int) -> _Captured:
            hidden = self._forward(bucket).clone()
            timer = step_timer(self.timing, self.device, self.model.config.num_layers,
                               kinds=self.layer_kinds)

            class Replay:
                def replay(_self) -> None:
                    replays.append(self.state_slots[:bucket].tolist())
                    if timer is not None:
                        timer.cpu_s = {}
                    with self.backend.layer_hook(timer):
                        hidden.copy_(self._forward(bucket))

            return _Captured(Replay(), hidden, timer)  # type: ignore[arg-type]

    llm = make_llm("alternating", kv_layout="nhd", page_size=16, attention_backend="triton",
                   max_num_seqs=3)
    engine = llm.engine
    assert engine.backend.capabilities.cuda_graphs
    runner = engine.runner
    runner.attention_timing = "one"  # graphs replay only when not timing every layer
    runner.graphs = StandIn(runner.model, runner.backend, runner.device, runner.page_size,
                            3, 512)
    runner.graphs.timing = "one"
    if capture_at_start:
        runner.graphs.capture_all()
    kinds: list[dict[str, float]] = []
    engine.observer.on_attention_kinds = lambda phase, s: kinds.append(s)  # type: ignore[method-assign]
    replays.clear()
    results = llm.generate(prompts()[:3], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    for i, (r, want) in enumerate(zip(results, hf_greedy("alternating")[:3], strict=True)):
        assert tuple(r.token_ids) == want, f"prompt {i}: ours {r.token_ids} != transformers {want}"
    assert replays, "no decode step replayed a graph"
    assert any(len(set(row) - {0}) == 3 for row in replays)  # three requests' own slots
    assert kinds and all(set(k) == {"softmax", "linear"} for k in kinds)
    check_released(llm)
