"""ModelRunner: one engine step on the device.

Takes plain host lists (the engine translates the scheduler's StepPlan), builds one
ForwardBatch, calls `backend.plan` once, runs the model (each layer calls
`backend.forward`), computes logits only for the rows that are sampled, and samples on
the device. Every step's attention time is measured through the backend's layer hook
(model/attention_timing.py), CUDA-graph replays included.

`launch` queues a step and returns at once: the sampled tokens stay on the device (the next
step may take its inputs from them, `DeferredTokens`), and what the host needs of them is
copied back asynchronously; `PendingStep.result` waits for that copy, the step's one host
synchronisation. `execute` is the two in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attention.base import AttentionBackend
from attention.batch import ForwardBatch
from kvcache.state_pool import StatePool
from model.attention_timing import (
    LaunchGapGuard,
    LayerTimer,
    TimingMode,
    default_timing_mode,
    step_timer,
)
from model.cuda_graphs import DecodeGraphs
from model.sampler import Sampler, SamplerOutput, TokenHistory, to_device
from scheduler.request import SamplingParams


@dataclass
class DeferredTokens:
    """Input tokens that the previous step sampled and whose values are still on the device:
    row `rows[i]` of this step's token_ids (a placeholder there) is `tokens[sources[i]]`."""

    tokens: torch.Tensor  # the previous step's sampled tokens [num sampled] int64, on device
    rows: list[int]
    sources: list[int]


@dataclass
class StepInput:
    token_ids: list[int]  # the new tokens of every sequence, concatenated
    q_lens: list[int]
    prefix_lens: list[int]
    page_tables: list[list[int]]
    num_decodes: int
    sample_seqs: list[int]  # indices of the sequences whose last token is sampled
    sampling: list[SamplingParams]  # one per sampled sequence
    generators: list[torch.Generator | None]
    # one per sampled sequence, for those whose logits are processed (penalties, min_tokens);
    # empty when none is
    histories: list[TokenHistory | None] = field(default_factory=list)
    # prompt logprobs wanted: (sequence index, top k, the tokens its first rows predict)
    prompt_logprobs: list[PromptLogprobRequest] = field(default_factory=list)
    deferred: DeferredTokens | None = None
    # hybrid models (linear-attention layers): each sequence's state slot; before the step,
    # slot dst := slot src (a prefix snapshot) or zeros (src -1) for each (dst, src); the
    # slots each sequence's state snapshots go to (kvcache/state_pool.py)
    state_slots: list[int] = field(default_factory=list)
    state_resets: list[tuple[int, int]] = field(default_factory=list)
    snapshot_slots: list[list[int]] = field(default_factory=list)


@dataclass
class PromptLogprobRequest:
    """Row j of sequence `seq`'s chunk predicts `targets[j]` (the next prompt token)."""

    seq: int
    top_k: int
    targets: list[int]


LogprobRow = tuple[float, list[tuple[int, float]]]  # (target's logprob, top (token, logprob))


@dataclass
class StepOutput:
    token_ids: list[int]
    # per sampled row: None, or (chosen token's logprob, [(token, logprob), ...] top list)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    attention_s: float | None = None
    # hybrid models: attention_s split by attention kind (softmax, linear)
    attention_by_kind: dict[str, float] | None = None
    phase: str = "decode"
    prompt_logprobs: dict[int, list[LogprobRow]] = field(default_factory=dict)  # by seq index
    device_s: float = 0.0  # the step's time on the device (HostCopies.step_s)


def _logprob_rows(
    sampled: SamplerOutput, params: list[SamplingParams]
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Per sampled row: None, or its logprob and top list (from host copies of `sampled`)."""
    if sampled.logprobs is None:
        return [None] * len(params)
    chosen = sampled.logprobs.tolist()
    top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
    top_ids = sampled.top_token_ids.tolist() if sampled.top_token_ids is not None else None
    rows: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            rows.append(None)
            continue
        top = list(zip(top_ids[i][: p.logprobs], top_lp[i][: p.logprobs], strict=True)) \
            if top_ids is not None and top_lp is not None else []
        rows.append((chosen[i], top))
    return rows


def _prompt_logprob_rows(pieces: list[tuple[torch.Tensor, ...]]) -> list[LogprobRow]:
    """(chosen, [top logprobs, top ids]) host tensors of a request's slices -> its rows."""
    rows: list[LogprobRow] = []
    for piece in pieces:
        chosen = piece[0].tolist()
        if len(piece) == 1:
            rows.extend((c, []) for c in chosen)
            continue
        top_lp, top_ids = piece[1].tolist(), piece[2].tolist()
        rows.extend((c, list(zip(i, v, strict=True)))
                    for c, i, v in zip(chosen, top_ids, top_lp, strict=True))
    return rows


class HostCopies:
    """Device tensors copied to pinned host memory without waiting, and the one event that
    says they have all arrived (on a CPU the tensors are used as they are). It also times
    the step: from its creation, at the start of the step's launch, to that event: on a GPU
    the device's time from reaching the step to finishing it (host gaps within included),
    on a CPU the launch's wall time."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self._event: torch.cuda.Event | None = None
        self._start: torch.cuda.Event | None = None
        self._t0 = time.perf_counter()
        self._cpu_s = 0.0
        if self.on_gpu:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.on_gpu:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def record(self) -> None:
        """After the step's last copy was queued."""
        if self.on_gpu:
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        self._cpu_s = time.perf_counter() - self._t0

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def step_s(self) -> float:
        """Call after `wait`."""
        if self._start is not None and self._event is not None:
            return self._start.elapsed_time(self._event) / 1e3
        return self._cpu_s


@dataclass
class PendingStep:
    """A launched step. `token_ids` (device) may feed the next step before `result`, which
    waits for the host copies (the step's one synchronisation) and builds the StepOutput."""

    token_ids: torch.Tensor | None  # [num sampled] int64 on the device; None: none sampled
    phase: str
    _copies: HostCopies
    _host_sampled: SamplerOutput | None
    _sampling: list[SamplingParams]
    _prompt_pieces: dict[int, list[tuple[torch.Tensor, ...]]]
    _attention_s: Callable[[], float | None]
    # hybrid models: the step's attention time by kind (None: one kind, or untimed)
    _attention_by_kind: Callable[[], dict[str, float]] | None = None

    def result(self) -> StepOutput:
        self._copies.wait()
        out = StepOutput(token_ids=[], phase=self.phase, attention_s=self._attention_s(),
                         device_s=self._copies.step_s())
        if self._attention_by_kind is not None:
            out.attention_by_kind = self._attention_by_kind()
        if self._host_sampled is not None:
            out.token_ids = self._host_sampled.token_ids.tolist()
            out.logprobs = _logprob_rows(self._host_sampled, self._sampling)
        for seq, pieces in self._prompt_pieces.items():
            out.prompt_logprobs[seq] = _prompt_logprob_rows(pieces)
        return out


def apply_deferred(input_ids: torch.Tensor, deferred: DeferredTokens | None) -> None:
    """Write the previous step's sampled tokens into this step's placeholder rows, on the
    device (the host never waits for their values)."""
    if deferred is None or not deferred.rows:
        return
    dev = input_ids.device
    rows = _index_tensor(deferred.rows, dev)
    sources = _index_tensor(deferred.sources, dev)
    input_ids.index_copy_(0, rows, deferred.tokens.index_select(0, sources))


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.int64, device)


PROMPT_LOGPROB_ROWS = 256  # rows of prompt logits computed at a time


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, backend: AttentionBackend, device: torch.device,
        page_size: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.page_size = page_size
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self.num_layers: int = model.config.num_layers
        self.attention_timing: TimingMode = default_timing_mode(device)
        self.last_timer: LayerTimer | None = None  # the last step's (for benchmarks)
        self.launch_guard = LaunchGapGuard(device) if device.type == "cuda" else None
        self.state_pool: StatePool | None = None  # hybrid models: linear-attention states
        # each layer's attention kind, when the model mixes them (timing splits by it)
        self.layer_kinds: list[str] | None = backend.layer_kinds

    def set_attention_timing(self, mode: TimingMode) -> None:
        """Switch how attention is timed (model/attention_timing.py); graphs for the new
        mode are captured now, so no serving step waits on a capture."""
        self.attention_timing = mode
        if self.graphs is not None and mode != "all":
            self.graphs.timing = mode
            with torch.inference_mode():
                self.graphs.capture_all()

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture decode steps of up to `max_batch` sequences (model/cuda_graphs.py)."""
        self.graphs = DecodeGraphs(self.model, self.backend, self.device, self.page_size,
                                   max_batch, max_model_len)
        self.graphs.timing = "off" if self.attention_timing == "all" else self.attention_timing
        with torch.inference_mode():
            self.graphs.capture_all()

    def warm_up(self) -> None:
        """Run a prefill, a decode and a mixed step eagerly on the scratch page (page 0, never
        handed out), so every kernel instance and library handle a serving step needs exists
        before the first request: no request pays for compiling or initialising them."""
        greedy = SamplingParams(temperature=0.0, max_tokens=1)

        def step(num_decodes: int, num_seqs: int) -> StepInput:
            return StepInput(
                token_ids=[0] * num_seqs, q_lens=[1] * num_seqs, prefix_lens=[0] * num_seqs,
                page_tables=[[0]] * num_seqs, num_decodes=num_decodes,
                sample_seqs=list(range(num_seqs)), sampling=[greedy] * num_seqs,
                generators=[None] * num_seqs,
            )

        self.backend.warm_up()
        graphs, self.graphs = self.graphs, None  # eager, even once graphs are captured
        try:
            for num_decodes, num_seqs in ((0, 1), (1, 1), (1, 2)):
                self.execute(step(num_decodes, num_seqs))
        finally:
            self.graphs = graphs

    def _use_graph(self, step: StepInput) -> bool:
        return (self.graphs is not None and self.attention_timing != "all"
                and step.num_decodes == len(step.q_lens) > 0
                and self.graphs.bucket_for(len(step.q_lens)) is not None)

    def _decode_with_graph(self, step: StepInput) -> torch.Tensor | None:
        assert self.graphs is not None
        ps = self.page_size
        positions = list(step.prefix_lens)  # a decode token sits right after its prefix
        slots = [pages[p // ps] * ps + p % ps
                 for p, pages in zip(positions, step.page_tables, strict=True)]
        seq_lens = [p + 1 for p in positions]
        return self.graphs.run(step.token_ids, positions, slots, seq_lens, step.page_tables,
                               fill_inputs=lambda ids: apply_deferred(ids, step.deferred),
                               state_slots=step.state_slots or None)

    def execute(self, step: StepInput) -> StepOutput:
        """Run one step and wait for its results."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> PendingStep:
        """Queue one step on the device; returns without waiting for it."""
        copies = HostCopies(self.device)  # first: it times the step
        fwd = self._forward(step)
        prompt_pieces = {}
        if fwd.batch is not None:
            prompt_pieces = {
                want.seq: self._prompt_logprobs(fwd.hidden, fwd.batch.qo_indptr_host[want.seq],
                                                want, copies)
                for want in step.prompt_logprobs
            }
        return self._sample(fwd, step, prompt_pieces, copies)

    @torch.inference_mode()
    def forward_only(self, step: StepInput) -> tuple[torch.Tensor, bool]:
        """The final hidden states of the step's sampled rows, nothing sampled, and whether a
        CUDA graph computed them (`bench step` times the parts of a step with it)."""
        fwd = self._forward(step)
        return self._pick_rows(fwd.hidden, fwd.last_rows), fwd.batch is None

    def _forward(self, step: StepInput) -> _Forward:
        if self.state_pool is not None:  # before a graph replay too (a re-admitted decode)
            self._reset_states(step.state_resets)
        if self._use_graph(step):
            hidden = self._decode_with_graph(step)
            if hidden is not None:
                assert self.graphs is not None
                timing = self.graphs.last_timing
                return _Forward(hidden, list(step.sample_seqs), None,
                                timing.elapsed_s if timing is not None else _no_timing,
                                "decode", None,
                                timing.elapsed_by_kind if timing is not None else None)
        state_slots = None
        if self.state_pool is not None:
            # warm-up steps carry no slots: they use the scratch slot
            state_slots = step.state_slots or [0] * len(step.q_lens)
        batch = ForwardBatch.build(
            step.q_lens, step.prefix_lens, step.page_tables, self.page_size, self.device,
            num_decodes=step.num_decodes, state_slots=state_slots,
            snapshot_slots=step.snapshot_slots or None,
        )
        input_ids = _index_tensor(step.token_ids, self.device)
        apply_deferred(input_ids, step.deferred)
        self.backend.plan(batch)
        timer = step_timer(self.attention_timing, self.device, self.num_layers,
                           guard=self.launch_guard, kinds=self.layer_kinds)
        if timer is not None:
            timer.start_step()
        with self.backend.layer_hook(timer):
            hidden = self.model(input_ids, batch.positions, self.backend)
        last_rows = [batch.qo_indptr_host[i + 1] - 1 for i in step.sample_seqs]
        return _Forward(hidden, last_rows, timer,
                        timer.elapsed_s if timer is not None else _no_timing, batch.phase, batch,
                        timer.elapsed_by_kind if timer is not None else None)

    def _reset_states(self, resets: list[tuple[int, int]]) -> None:
        if not resets:
            return
        assert self.state_pool is not None
        copies = [(d, s) for d, s in resets if s >= 0]
        self.state_pool.reset(_index_tensor([d for d, s in resets if s < 0], self.device),
                              _index_tensor([d for d, _ in copies], self.device),
                              _index_tensor([s for _, s in copies], self.device))

    def _prompt_logprobs(self, hidden: torch.Tensor, first: int, want: PromptLogprobRequest,
                         to_host: HostCopies) -> list[tuple[torch.Tensor, ...]]:
        """The model's logprob of each next prompt token (and the top k) at the chunk's rows,
        a slice of rows at a time (a [rows, vocab] float32 block is large), as host copies."""
        pieces: list[tuple[torch.Tensor, ...]] = []
        for j0 in range(0, len(want.targets), PROMPT_LOGPROB_ROWS):
            targets = want.targets[j0 : j0 + PROMPT_LOGPROB_ROWS]
            logp = self.model.compute_logits(
                hidden[first + j0 : first + j0 + len(targets)]).log_softmax(dim=-1)
            index = _index_tensor(targets, logp.device)[:, None]
            chosen = to_host(logp.gather(1, index)[:, 0])
            if want.top_k > 0:
                top_lp, top_ids = logp.topk(want.top_k, dim=-1)
                pieces.append((chosen, to_host(top_lp), to_host(top_ids)))
            else:
                pieces.append((chosen,))
        return pieces

    def _pick_rows(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        first = rows[0] if rows else 0
        if rows == list(range(first, first + len(rows))):
            return hidden[first : first + len(rows)]  # e.g. every decode row
        return hidden[_index_tensor(rows, self.device)]

    def _sample(self, fwd: _Forward, step: StepInput,
                prompt_pieces: dict[int, list[tuple[torch.Tensor, ...]]],
                copies: HostCopies) -> PendingStep:
        self.last_timer = fwd.timer
        token_ids: torch.Tensor | None = None
        host_sampled: SamplerOutput | None = None
        if fwd.last_rows:
            logits = self.model.compute_logits(self._pick_rows(fwd.hidden, fwd.last_rows))
            sampled = self.sampler(logits, step.sampling, step.generators,
                                   step.histories or None)
            token_ids = sampled.token_ids
            host_sampled = SamplerOutput(
                token_ids=copies(sampled.token_ids),
                logprobs=copies(sampled.logprobs) if sampled.logprobs is not None else None,
                top_logprobs=(copies(sampled.top_logprobs)
                              if sampled.top_logprobs is not None else None),
                top_token_ids=(copies(sampled.top_token_ids)
                               if sampled.top_token_ids is not None else None),
            )
        copies.record()
        return PendingStep(token_ids, fwd.phase, copies, host_sampled, list(step.sampling),
                           prompt_pieces, fwd.attention_s,
                           fwd.attention_by_kind if self.layer_kinds is not None else None)


@dataclass
class _Forward:
    """A step's forward pass as queued: its final hidden states and what sampling needs."""

    hidden: torch.Tensor
    last_rows: list[int]  # the rows of `hidden` that are sampled
    timer: LayerTimer | None
    attention_s: Callable[[], float | None]
    phase: str
    batch: ForwardBatch | None  # None: a CUDA graph ran the step
    attention_by_kind: Callable[[], dict[str, float]] | None = None


def _no_timing() -> float | None:
    return None
