"""Issue 23 (a): overlap scheduling changes no output.

The same requests run through an engine that reads each step's tokens before scheduling
the next (`overlap_schedule=False`) and one that schedules step N+1 while step N's tokens
are still on the device. Greedy and seeded sampling, stop strings, stop ids, EOS,
max_tokens, min_tokens, penalties, aborts in flight and preemption (a small KV pool) must
give the same tokens, text and finish reasons; no request may receive anything after its
finishing output, and a stop string's text never reaches the stream.

A tiny random Llama (the embedded tokenizer, a 512-token vocabulary so that EOS comes up)
keeps it fast; the reference backend runs it on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import torch

from model.loader import LoadedModel, embedded_tokenizer, empty_model
from model.presets import init_synthetic_weights, synthetic_config
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore, RequestOutput

VOCAB = 512


@functools.cache
def tiny_model() -> LoadedModel:
    cfg = dataclasses.replace(
        synthetic_config("llama3-8b"), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = empty_model(cfg, torch.float32, torch.device("cpu"))
    init_synthetic_weights(model, 1234, std=0.3)  # peaked logits: no greedy near-ties
    return LoadedModel(model, cfg, embedded_tokenizer(), "tiny random llama")


def make_engine(overlap: bool, kv_cache_tokens: int = 4096, **overrides: object) -> EngineCore:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=kv_cache_tokens,
                          max_num_batched_tokens=64, page_size=4, overlap_schedule=overlap,
                          log_stats=False, **overrides)
    return EngineCore(config, loaded=tiny_model())


@dataclasses.dataclass
class Stream:
    outputs: list[RequestOutput] = dataclasses.field(default_factory=list)
    after_finish: int = 0  # outputs received after the finishing one: must stay 0

    def sink(self, out: RequestOutput) -> None:
        if self.outputs and self.outputs[-1].finished:
            self.after_finish += 1
        self.outputs.append(out)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.new_token_ids]

    @property
    def text(self) -> str:
        return "".join(o.new_text for o in self.outputs)

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[-1].finish_reason if self.outputs else None


def run(engine: EngineCore, prompts: list[list[int]], params: list[SamplingParams],
        abort_after: dict[int, int] | None = None) -> list[Stream]:
    """Submit every prompt, step until done; request i is aborted once it has received
    abort_after[i] tokens (the abort is applied at the start of the next step)."""
    streams = [Stream() for _ in prompts]
    abort_after = abort_after or {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        stream = streams[i]

        def sink(out: RequestOutput, i: int = i, stream: Stream = stream) -> None:
            stream.sink(out)
            if i in abort_after and not out.finished and len(stream.tokens) == abort_after[i]:
                engine.abort(f"r{i}")

        engine.add_request(prompt, p, f"r{i}", sink)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 2000
    assert not engine.scheduler.has_unfinished()
    assert engine.allocator.num_free + engine.prefix_cache.num_cached_pages \
        == engine.allocator.num_total  # no page leaked
    return streams


def prompts_for(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(20, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def assert_same(a: list[Stream], b: list[Stream]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert (x.tokens, x.text, x.finish_reason) == (y.tokens, y.text, y.finish_reason), i
        for s in (x, y):
            assert s.after_finish == 0 and s.outputs[-1].finished
            assert sum(o.finished for o in s.outputs) == 1


def test_greedy_and_seeded_streams_equal_with_and_without_overlap() -> None:
    prompts = prompts_for(12)
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:
            p = SamplingParams(max_tokens=5 + 3 * i, temperature=0.0)
        elif i % 3 == 1:
            p = SamplingParams(max_tokens=30, temperature=0.9, top_k=40, top_p=0.9, seed=i)
        else:
            p = SamplingParams(max_tokens=25, temperature=0.7, seed=100 + i, min_tokens=4,
                               frequency_penalty=0.5 if i == 5 else 0.0)
        params.append(p)
    streams = {ov: run(make_engine(ov), prompts, params) for ov in (False, True)}
    assert_same(streams[False], streams[True])
    reasons = {s.finish_reason for s in streams[True]}
    assert reasons == {"length", "stop"}  # EOS ended some, max_tokens others
    assert [len(s.tokens) for s in streams[True]][::3] == [5, 14, 23, 32]


def test_stop_strings_and_ids_cut_exactly_where_the_full_stream_has_them() -> None:
    prompts = prompts_for(8, seed=1)
    base = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] * len(prompts)
    full = run(make_engine(False), prompts, base)
    params, expected_text = [], []
    for i, s in enumerate(full):
        text = s.text
        assert len(text) > 20
        if i % 2 == 0:  # a stop string taken from the middle of the full text
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            params.append(dataclasses.replace(base[i], stop=[stop]))
            expected_text.append(text[: text.find(stop)])
        else:  # a stop id: the stream's 10th token
            params.append(dataclasses.replace(base[i], stop_token_ids=[s.tokens[9]]))
            expected_text.append(None)
    streams = {ov: run(make_engine(ov), prompts, params) for ov in (False, True)}
    assert_same(streams[False], streams[True])
    for i, s in enumerate(streams[True]):
        assert s.finish_reason == "stop"
        if expected_text[i] is not None:
            assert s.text == expected_text[i]  # nothing of the stop string, nothing after it
            assert params[i].stop[0] not in s.text
        else:
            first = full[i].tokens.index(params[i].stop_token_ids[0])
            assert s.tokens == full[i].tokens[: first + 1]


def test_aborts_in_flight_and_preemption_keep_the_streams() -> None:
    prompts = prompts_for(10, seed=2)
    params = [SamplingParams(max_tokens=48, temperature=0.0 if i % 2 else 0.8, seed=i,
                             ignore_eos=True) for i in range(len(prompts))]
    aborts = {1: 3, 4: 1, 7: 10}
    streams, preemptions = {}, {}
    for ov in (False, True):
        engine = make_engine(ov, kv_cache_tokens=256, max_num_seqs=10)  # too few pages for all
        streams[ov] = run(engine, prompts, params, aborts)
        preemptions[ov] = engine.scheduler.num_preemptions_total
    assert preemptions[False] > 0 and preemptions[True] > 0
    assert_same(streams[False], streams[True])
    for i, s in enumerate(streams[True]):
        if i in aborts:
            assert s.finish_reason == "abort" and len(s.tokens) == aborts[i]
        else:
            assert s.finish_reason == "length" and len(s.tokens) == 48


def test_overlap_reads_the_previous_steps_tokens_on_the_device() -> None:
    """With overlap, a decode's input token is a placeholder on the host when its step is
    built: the engine must take it from the device (else the streams above would differ)."""
    engine = make_engine(True)
    seen: list[int] = []
    launch = engine.runner.launch

    def spy(step):  # type: ignore[no-untyped-def]
        if step.deferred is not None:
            seen.append(len(step.deferred.rows))
        return launch(step)

    engine.runner.launch = spy  # type: ignore[method-assign]
    run(engine, prompts_for(3, seed=3), [SamplingParams(max_tokens=6, temperature=0.0,
                                                        ignore_eos=True)] * 3)
    assert seen and max(seen) == 3
