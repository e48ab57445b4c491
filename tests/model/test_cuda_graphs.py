"""Decode CUDA graphs: staging, padding and graph keying, checked on CPU.

A CPU has no CUDA graphs, so `_capture` is replaced by a stand-in whose replay runs the
same forward pass on the same static buffers: everything but the capture itself (padding
to a bucket, the static batch the backend plans on, the split-count keys, scratch-page
writes of padding rows) is the code that runs on the GPU. The Triton backend runs under
the interpreter. On the GPU, `python -m bench.cuda_graphs` checks that the real
graphs produce the eager path's tokens.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import dataclasses
import random

import pytest
import torch

from attention.backends.triton_backend import TritonBackend
from attention.base import AttentionConfig
from attention.batch import ForwardBatch
from attention.variants import Variant
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig
from model.attention_timing import step_timer
from model.cuda_graphs import DecodeGraphs, _Captured, decode_buckets
from model.loader import empty_model
from model.presets import init_synthetic_weights, synthetic_config
from model.runner import DeferredTokens, ModelRunner, StepInput
from scheduler.request import SamplingParams


class _EagerReplay:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.fn()


class StandInGraphs(DecodeGraphs):
    """`_capture` without CUDA: replay() reruns the forward pass into the output buffer, and
    first checks that what a real graph would have frozen at capture (the split count, the
    scratch and block-table addresses, the table's row stride) is what this step planned.
    Its timer, like a graph's captured events, holds the last replay's attention time."""

    def _frozen(self) -> tuple:
        bufs = self.backend.split_buffers
        return (self.backend.num_splits, bufs.part_out.data_ptr(), bufs.part_stat.data_ptr(),
                self.block_table.data_ptr(), self.block_table.stride(0))

    def _capture(self, bucket: int) -> _Captured:
        hidden = self._forward(bucket).clone()
        frozen = self._frozen()

        timer = step_timer(self.timing, self.device, self.model.config.num_layers)

        def run() -> None:
            assert self._frozen() == frozen, "a real graph would replay stale host decisions"
            if timer is not None:
                timer.cpu_s = {}
            with self.backend.layer_hook(timer):
                hidden.copy_(self._forward(bucket))

        return _Captured(_EagerReplay(run), hidden, timer)  # type: ignore[arg-type]


def test_buckets_cover_every_batch_size() -> None:
    for max_batch in (1, 3, 8, 30, 64, 100, 256):
        sizes = decode_buckets(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
        for n in range(1, max_batch + 1):
            b = next(s for s in sizes if s >= n)
            assert b - n < max(4, b // 2), (max_batch, n, b)  # bounded padding
            assert b - n < (8 if b <= 64 else 16 if b <= 128 else 32), (max_batch, n, b)


def _setup(layout_name: str, page_size: int):
    cfg = dataclasses.replace(
        synthetic_config("llama3-8b"), vocab_size=128, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
    )
    model = empty_model(cfg, torch.float32, torch.device("cpu"))
    init_synthetic_weights(model, random.randrange(1000), std=0.2)
    layout = KVLayout.create(layout_name, page_size, cfg.num_kv_heads, cfg.head_dim, "float32")
    num_pages = 2048 if page_size == 1 else 64
    pool = KVPool(KVPoolConfig(layout, cfg.num_layers, num_pages, torch.float32,
                               torch.device("cpu")))
    attn = AttentionConfig(num_q_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                           head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5, variant=Variant())
    backend = TritonBackend(attn, pool)
    backend.min_tokens_per_split = 16  # several splits at these short lengths
    runner = ModelRunner(model, backend, torch.device("cpu"), page_size)
    runner.attention_timing = "one"  # as on a GPU: graphs replay, one layer timed
    return cfg, model, pool, backend, runner, num_pages


def _step(q_lens, prefix_lens, tables, tokens) -> StepInput:
    n = len(q_lens)
    return StepInput(
        token_ids=tokens, q_lens=q_lens, prefix_lens=prefix_lens, page_tables=tables,
        num_decodes=n if all(q == 1 for q in q_lens) else 0,
        sample_seqs=list(range(n)),
        sampling=[SamplingParams(temperature=0.0)] * n, generators=[None] * n,
    )


@pytest.mark.parametrize(("layout_name", "page_size"), [("nhd", 4), ("token", 1), ("hnd_x", 8)])
def test_padded_graph_step_equals_eager_decode(layout_name: str, page_size: int) -> None:
    cfg, model, pool, backend, runner, num_pages = _setup(layout_name, page_size)
    rng = random.Random()
    lens = [rng.randrange(20, 60) for _ in range(3)]
    pages = list(range(1, num_pages))  # page 0 is the scratch page
    rng.shuffle(pages)
    tables = []
    for n in lens:
        need = -(-(n + 1) // page_size)
        tables.append([pages.pop() for _ in range(need)])
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in lens]
    # prefill eagerly
    runner.execute(_step(lens, [0] * 3, tables, sum(prompts, [])))
    new_tokens = [rng.randrange(cfg.vocab_size) for _ in range(3)]

    # the eager decode step's final hidden states
    with torch.inference_mode():
        batch = ForwardBatch.build([1] * 3, lens, tables, page_size, torch.device("cpu"),
                                   num_decodes=3)
        backend.plan(batch)
        eager_splits = backend.num_splits
        expected = model(torch.tensor(new_tokens), batch.positions, backend)

    graphs = StandInGraphs(model, backend, torch.device("cpu"), page_size, max_batch=8,
                           max_model_len=256)
    graphs.timing = "one"
    assert graphs.buckets == [1, 2, 4, 8]
    kv_before = [t.clone() for t in (*pool.k_caches, *pool.v_caches)]
    runner.graphs = graphs
    step = _step([1] * 3, lens, tables, new_tokens)
    assert runner._use_graph(step)
    with torch.inference_mode():
        got = runner._decode_with_graph(step)
    assert got.shape == (3, cfg.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # one graph, for the bucket of 4 and the (power-of-two) split count of this step
    assert list(graphs._graphs) == [(4, backend.num_splits, True)]
    assert backend.num_splits & (backend.num_splits - 1) == 0
    assert eager_splits > 1  # the step really exercises split-KV and the merge
    # the padding row wrote only the scratch page; real pages got the same K/V again
    for before, after in zip(kv_before, (*pool.k_caches, *pool.v_caches), strict=True):
        torch.testing.assert_close(after[1:], before[1:])
    # a full step through the runner samples from the graph's rows
    with torch.inference_mode():
        out = runner.execute(step)
    assert len(out.token_ids) == 3 and out.phase == "decode"
    assert graphs._graphs[(4, backend.num_splits, True)].graph.replays == 2
    # the replay timed its attention: one layer's, scaled by the layer count
    timer = graphs._graphs[(4, backend.num_splits, True)].timer
    assert out.attention_s is not None and out.attention_s > 0
    assert out.attention_s == timer.elapsed_s() and timer.scale == cfg.num_layers


def test_steps_that_cannot_use_a_graph_run_eagerly() -> None:
    _, _, _, backend, runner, _ = _setup("nhd", 4)
    runner.graphs = StandInGraphs(runner.model, backend, torch.device("cpu"), 4, max_batch=2,
                                  max_model_len=64)
    tables = [[1, 2], [3, 4], [5, 6]]
    assert not runner._use_graph(_step([1, 1, 1], [3, 3, 3], tables, [1, 2, 3]))  # > bucket
    assert not runner._use_graph(_step([5, 1], [0, 3], tables[:2], [1] * 6))  # prefill
    decode = _step([1, 1], [3, 3], tables[:2], [1, 2])
    runner.attention_timing = "all"
    assert not runner._use_graph(decode)  # every layer timed: the eager reference
    runner.attention_timing = "one"
    assert runner._use_graph(decode)


def test_split_scratch_captured_by_graphs_is_never_freed() -> None:
    # Graphs replay with the scratch addresses they captured; an eager step larger than any
    # graph may grow the scratch later, and the old buffers must stay allocated.
    _, _, _, backend, _, _ = _setup("nhd", 4)
    backend.prepare_cuda_graphs(max_batch=4, max_model_len=256)
    captured = backend.split_buffers.part_out
    backend.split_buffers.ensure(64, backend.config.num_q_heads, 64, 16)
    assert backend.split_buffers.part_out is not captured
    assert any(out is captured for out, _ in backend.split_buffers.retired)


def test_start_up_capture_covers_every_step() -> None:
    # After capture_all, no decode step of any batch size and context length up to
    # max_model_len needs a new graph (a capture while serving stalls the step).
    _, _, _, backend, runner, _ = _setup("nhd", 4)  # min_tokens_per_split lowered to 16
    graphs = StandInGraphs(runner.model, backend, torch.device("cpu"), 4, max_batch=6,
                           max_model_len=200)
    with torch.inference_mode():
        graphs.capture_all()
        captured = dict(graphs._graphs)
        assert len(captured) > len(graphs.buckets)  # several split counts were needed
        rng = random.Random()
        for _ in range(12):
            n = rng.randrange(1, 7)
            lens = [rng.randrange(1, 201) for _ in range(n)]
            out = graphs.run([0] * n, [x - 1 for x in lens], [0] * n, lens, [[] for _ in range(n)])
            assert out is not None and out.shape[0] == n
    assert graphs._graphs == captured


def test_graph_step_reads_deferred_tokens_on_the_device_and_keeps_each_replays_timing() -> None:
    """Overlap scheduling: a decode step's input may be the previous step's sample, still on
    the device (`DeferredTokens`); the graph's staged input ids get it before the replay.
    Two replays of one graph in flight each keep their own attention time."""
    cfg, model, pool, backend, runner, num_pages = _setup("nhd", 4)
    rng = random.Random()
    lens = [rng.randrange(20, 60) for _ in range(3)]
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    tables = [[pages.pop() for _ in range(-(-(n + 2) // 4))] for n in lens]
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in lens]
    prefill = runner.launch(_step(lens, [0] * 3, tables, sum(prompts, [])))
    sampled = prefill.result().token_ids
    runner.graphs = StandInGraphs(model, backend, torch.device("cpu"), 4, max_batch=4,
                                  max_model_len=256)
    runner.graphs.timing = "one"
    with torch.inference_mode():
        real = runner._decode_with_graph(_step([1] * 3, lens, tables, sampled)).clone()
        # rows 1 and 2 come from the device, swapped in the sampled tensor's order
        swapped = torch.stack([prefill.token_ids[0], prefill.token_ids[2], prefill.token_ids[1]])
        step = _step([1] * 3, lens, tables, [sampled[0], 0, 0])
        step.deferred = DeferredTokens(swapped, rows=[1, 2], sources=[2, 1])
        got = runner._decode_with_graph(step).clone()
        step.deferred = None
        stand_in = runner._decode_with_graph(step).clone()
    torch.testing.assert_close(got, real, rtol=0, atol=0)
    assert not torch.equal(stand_in, real)  # the placeholders alone give other states
    # two steps of the same graph launched before either result is read
    first = runner.launch(_step([1] * 3, lens, tables, sampled))
    first_attention = runner.graphs.last_timing.timer.elapsed_s()
    second = runner.launch(_step([1] * 3, [n + 1 for n in lens], tables, [1, 2, 3]))
    assert first.result().attention_s == first_attention
    assert second.result().attention_s == runner.graphs.last_timing.timer.elapsed_s()
