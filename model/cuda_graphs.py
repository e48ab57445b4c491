"""CUDA graphs for decode steps.

A decode step of a small batch runs hundreds of short kernels (per layer: norms, three
matmuls, rotary + store, attention, merge), and launching them from Python costs more than
running them. A captured graph replays the whole forward pass with one launch.

A graph fixes its tensors' addresses and shapes, so:
- every input lives in a static buffer sized for the largest batch, and a step is padded
  up to the next captured batch size (`decode_buckets`). Padding rows decode token 0 at
  position 0 from the scratch page 0 (seq_len 1, slot 0), so they touch no real page and
  their outputs are dropped;
- the attention backend's `plan(batch, graph_mode=True)` runs before each replay on views
  of the same buffers; what it decides on the host (`graph_key`, e.g. the number of KV
  splits) is part of the graph, so graphs are keyed by (batch size, graph_key), every
  pair a context can need is captured at start, and the backend sizes its scratch once
  for the worst case (`prepare_cuda_graphs`) before any capture.
Only the forward pass to the final norm is captured; logits and sampling run eagerly on
the rows that are sampled. Steps with prefill or larger batches run eagerly. With `timing`
"one", each graph records CUDA events around one layer's attention on every replay
(model/attention_timing.py); graphs are keyed by whether they do, so switching the mode
captures the other set once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from attention.base import AttentionBackend
from attention.batch import ForwardBatch
from model.attention_timing import LayerTimer, TimingMode, step_timer

logger = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 128, then
    every 32, ending at `max_batch`: a step is padded by fewer than 8, 16 or 32 rows."""
    sizes = [1, 2, 4]
    n = 8
    while n < max_batch:
        sizes.append(n)
        n += 8 if n < 64 else 16 if n < 128 else 32
    sizes = [s for s in sizes if s < max_batch]
    return sizes + [max_batch]


class ReplayTiming:
    """The attention time of one replay. The graph's events are re-recorded by its next
    replay, so before that replay `freeze` reads them (waiting, if need be, for this replay's
    timed layer, which is done long before the replay's end in practice)."""

    def __init__(self, timer: LayerTimer) -> None:
        self.timer = timer
        self.by_kind: dict[str, float] | None = None

    def freeze(self) -> None:
        if self.by_kind is None:
            if self.timer.events:
                self.timer.events[-1][1].synchronize()
            self.by_kind = self.timer.elapsed_by_kind()

    def elapsed_by_kind(self) -> dict[str, float]:
        """Call once the replay has completed (its tokens were read)."""
        if self.by_kind is None:
            self.by_kind = self.timer.elapsed_by_kind()
        return self.by_kind

    def elapsed_s(self) -> float | None:
        return sum(self.elapsed_by_kind().values())


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output: [bucket, hidden_size]
    timer: LayerTimer | None  # its attention events, recorded on every replay
    last_replay: ReplayTiming | None = field(default=None)


class DecodeGraphs:
    """Decode forward passes captured per (padded batch size, KV split count)."""

    def __init__(
        self, model: torch.nn.Module, backend: AttentionBackend, device: torch.device,
        page_size: int, max_batch: int, max_model_len: int,
    ) -> None:
        if not backend.capabilities.cuda_graphs:
            raise ValueError(f"attention backend {backend.name!r} cannot be captured in a graph")
        self.model = model
        self.backend = backend
        self.device = device
        self.page_size = page_size
        self.buckets = decode_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_pages = -(-max_model_len // page_size)
        B = self.max_batch
        ints = {"device": device}
        self.input_ids = torch.zeros(B, dtype=torch.int64, **ints)
        self.positions = torch.zeros(B, dtype=torch.int64, **ints)
        self.slot_mapping = torch.zeros(B, dtype=torch.int64, **ints)
        self.seq_lens = torch.ones(B, dtype=torch.int32, **ints)
        self.prefix_lens = torch.zeros(B, dtype=torch.int32, **ints)
        self.qo_indptr = torch.arange(B + 1, dtype=torch.int32, **ints)
        self.block_table = torch.zeros(B, self.max_pages, dtype=torch.int32, **ints)
        # hybrid models: each row's linear-attention state slot (padding rows: scratch 0)
        self.layer_kinds = backend.layer_kinds
        self.state_slots = torch.zeros(B, dtype=torch.int32, **ints) \
            if self.layer_kinds is not None else None
        pin = device.type == "cuda"
        # host staging: ids, positions, slots, seq_lens, prefix_lens, state slots (int64),
        # and the block table's used columns (a contiguous [bucket, width] block of a flat
        # buffer)
        self._host_vec = torch.zeros(6, B, dtype=torch.int64, pin_memory=pin)
        self._host_table = torch.zeros(B * self.max_pages, dtype=torch.int32, pin_memory=pin)
        # the staging buffers are rewritten only after the previous step's copies finished
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._graphs: dict[tuple[int, Hashable, bool], _Captured] = {}
        self._failed: set[tuple[int, Hashable, bool]] = set()
        self.timing: TimingMode = "off"  # "one" or "off" ("all" never replays a graph)
        self.last_timer: LayerTimer | None = None  # of the last replay
        self.last_timing: ReplayTiming | None = None  # the last replay's attention time
        self._last_replayed: _Captured | None = None
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.max_model_len = max_model_len
        backend.prepare_cuda_graphs(self.max_batch, max_model_len)

    # ------------------------------------------------------------------ public

    def bucket_for(self, batch_size: int) -> int | None:
        for b in self.buckets:
            if b >= batch_size:
                return b
        return None

    def capture_all(self) -> None:
        """Capture every bucket at every split count a context up to `max_model_len` can
        ask for, on padding rows only, so no serving step waits on a capture (a capture
        mid-serving stalled TTFT by seconds on the H100)."""
        t0 = time.perf_counter()
        lengths = self.backend.cuda_graph_context_lengths(self.max_model_len)
        # largest first: the shared pool then holds the largest graph's temporaries, which
        # the smaller graphs reuse
        for b in reversed(self.buckets):
            for length in lengths:
                host_lens = [length] * b
                batch = self._stage([0] * b, [0] * b, [0] * b, host_lens, [[] for _ in range(b)], b)
                self.backend.plan(batch, graph_mode=True)
                key = self._key(b)
                if key not in self._graphs:
                    self._graphs[key] = self._capture(b)
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(self._graphs), self.buckets, time.perf_counter() - t0)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(
        self, token_ids: list[int], positions: list[int], slots: list[int],
        seq_lens: list[int], page_tables: list[list[int]],
        fill_inputs: Callable[[torch.Tensor], None] | None = None,
        state_slots: list[int] | None = None,
    ) -> torch.Tensor | None:
        """Decode one token for each of len(token_ids) sequences; returns their final
        hidden states [n, hidden] (a view of the graph's output, valid until the next run),
        or None when this step's graph cannot be captured (the caller runs it eagerly).
        `fill_inputs` may then change the staged input ids on the device (the previous
        step's tokens, model/runner.py `DeferredTokens`)."""
        n = len(token_ids)
        bucket = self.bucket_for(n)
        if bucket is None:
            raise ValueError(f"batch of {n} exceeds the largest captured size {self.max_batch}")
        batch = self._stage(token_ids, positions, slots, seq_lens, page_tables, bucket,
                            state_slots)
        if fill_inputs is not None:
            fill_inputs(self.input_ids)
        self.backend.plan(batch, graph_mode=True)
        key = self._key(bucket)
        if key in self._failed:
            return None
        captured = self._graphs.get(key)
        if captured is None:
            # not captured at start (cuda_graph_context_lengths missed it): capture now
            logger.warning("capturing decode graph %s while serving", key)
            try:
                captured = self._graphs[key] = self._capture_while_serving(bucket)
            except Exception:  # a step never fails for want of a graph
                logger.exception("decode graph %s could not be captured; it runs eagerly", key)
                self._failed.add(key)
                return None
            # capturing ran the step eagerly once; replaying it again is idempotent (the same
            # K/V is stored to the same slots) and gives the output tensor its values
        if captured.last_replay is not None:
            captured.last_replay.freeze()  # this replay re-records the events it reads
        captured.graph.replay()
        self.last_timer = captured.timer
        timing = ReplayTiming(captured.timer) if captured.timer is not None else None
        captured.last_replay = self.last_timing = timing
        self._last_replayed = captured
        return captured.hidden[:n]

    def replay_last(self) -> None:
        """Replay the last run's graph on the inputs it staged: the forward pass's device time
        alone, for benchmarks (it stores the same K/V to the same slots again, and a hybrid
        model's states take the token again)."""
        if self._last_replayed is None:
            raise RuntimeError("no decode graph has run yet")
        self._last_replayed.graph.replay()

    # ------------------------------------------------------------------ internals

    def _key(self, bucket: int) -> tuple[int, Hashable, bool]:
        """After `plan`: the graph that serves this step."""
        return (bucket, self.backend.graph_key(), self.timing == "one")

    def _stage(
        self, token_ids: list[int], positions: list[int], slots: list[int],
        seq_lens: list[int], page_tables: list[list[int]], bucket: int,
        state_slots: list[int] | None = None,
    ) -> ForwardBatch:
        """Copy a step's inputs (padded to `bucket`) into the static buffers."""
        n = len(token_ids)
        pad = bucket - n
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the staging
        vec = self._host_vec
        vec[0, :bucket] = torch.tensor(token_ids + [0] * pad)
        vec[1, :bucket] = torch.tensor(positions + [0] * pad)
        vec[2, :bucket] = torch.tensor(slots + [0] * pad)
        vec[3, :bucket] = torch.tensor(seq_lens + [1] * pad)
        vec[4, :bucket] = torch.tensor([length - 1 for length in seq_lens] + [0] * pad)
        vec[5, :bucket] = torch.tensor((state_slots or [0] * n) + [0] * pad)
        # Only the columns this step uses: the kernels read a row's pages below its
        # seq_len only, so stale columns further right are never read. Padding rows get
        # page 0 in every copied column.
        width = max(1, max((len(p) for p in page_tables), default=1))
        table = self._host_table[: bucket * width].view(bucket, width)
        table.zero_()
        for i, pages in enumerate(page_tables):
            if pages:
                table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        nb = self.device.type == "cuda"
        self.input_ids[:bucket].copy_(vec[0, :bucket], non_blocking=nb)
        self.positions[:bucket].copy_(vec[1, :bucket], non_blocking=nb)
        self.slot_mapping[:bucket].copy_(vec[2, :bucket], non_blocking=nb)
        self.seq_lens[:bucket].copy_(vec[3, :bucket], non_blocking=nb)
        self.prefix_lens[:bucket].copy_(vec[4, :bucket], non_blocking=nb)
        self.block_table[:bucket, :width].copy_(table, non_blocking=nb)
        if self.state_slots is not None:
            self.state_slots[:bucket].copy_(vec[5, :bucket], non_blocking=nb)
        if self._copied is not None:
            self._copied.record()
        return ForwardBatch(
            positions=self.positions[:bucket],
            qo_indptr=self.qo_indptr[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            prefix_lens=self.prefix_lens[:bucket],
            block_table=self.block_table[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            qo_indptr_host=list(range(bucket + 1)),
            seq_lens_host=list(seq_lens) + [1] * pad,
            num_decodes=bucket,
            page_size=self.page_size,
            state_slots=self.state_slots[:bucket] if self.state_slots is not None else None,
        )

    def _capture_while_serving(self, bucket: int) -> _Captured:
        """`_capture` on this step's staged inputs. Its eager run stores the same K/V the
        replay stores again, but a linear-attention state would take the token twice: the
        eager run gets the scratch slot instead."""
        if self.state_slots is None:
            return self._capture(bucket)
        staged = self.state_slots[:bucket].clone()
        self.state_slots[:bucket].zero_()
        try:
            return self._capture(bucket)
        finally:
            self.state_slots[:bucket].copy_(staged)

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.backend)

    def _capture(self, bucket: int) -> _Captured:
        # one eager run first (on a side stream, as capture requires): compiles any kernel
        # specialisation and lets the allocator settle outside the graph
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        timer = step_timer(self.timing, self.device, self.model.config.num_layers,
                           external=True, kinds=self.layer_kinds)
        with torch.cuda.graph(graph, pool=self._pool), self.backend.layer_hook(timer):
            hidden = self._forward(bucket)
        return _Captured(graph, hidden, timer)
