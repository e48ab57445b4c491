"""ModelRunner: one engine step on the device.

Takes plain host lists (the engine translates the scheduler's StepPlan), builds one
ForwardBatch, calls `backend.plan` once, runs the model (each layer calls
`backend.forward`), computes logits only for the rows that are sampled, and samples on
the device. Every step's attention time is measured through the backend's layer hook
(model/attention_timing.py), CUDA-graph replays included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attention.base import AttentionBackend
from attention.batch import ForwardBatch
from model.attention_timing import (
    LaunchGapGuard,
    LayerTimer,
    TimingMode,
    default_timing_mode,
    step_timer,
)
from model.cuda_graphs import DecodeGraphs
from model.sampler import Sampler, SamplerOutput, TokenHistory
from scheduler.request import SamplingParams


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
    phase: str = "decode"
    prompt_logprobs: dict[int, list[LogprobRow]] = field(default_factory=dict)  # by seq index


def _logprob_rows(
    sampled: SamplerOutput, params: list[SamplingParams]
) -> list[tuple[float, list[tuple[int, float]]] | None]:
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
        return self.graphs.run(step.token_ids, positions, slots, seq_lens, step.page_tables)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        if self._use_graph(step):
            hidden = self._decode_with_graph(step)
            if hidden is not None:
                assert self.graphs is not None
                return self._sample(hidden, list(step.sample_seqs), step,
                                    self.graphs.last_timer, "decode")
        batch = ForwardBatch.build(
            step.q_lens, step.prefix_lens, step.page_tables, self.page_size, self.device,
            num_decodes=step.num_decodes,
        )
        input_ids = torch.tensor(step.token_ids, dtype=torch.int64)
        if self.device.type == "cuda":
            input_ids = input_ids.pin_memory()
        input_ids = input_ids.to(self.device, non_blocking=True)
        self.backend.plan(batch)
        timer = step_timer(self.attention_timing, self.device, self.num_layers,
                           guard=self.launch_guard)
        if timer is not None:
            timer.start_step()
        with self.backend.layer_hook(timer):
            hidden = self.model(input_ids, batch.positions, self.backend)
        last_rows = [batch.qo_indptr_host[i + 1] - 1 for i in step.sample_seqs]
        out = self._sample(hidden, last_rows, step, timer, batch.phase)
        for want in step.prompt_logprobs:
            first = batch.qo_indptr_host[want.seq]
            out.prompt_logprobs[want.seq] = self._prompt_logprobs(hidden, first, want)
        return out

    def _prompt_logprobs(self, hidden: torch.Tensor, first: int,
                         want: PromptLogprobRequest) -> list[LogprobRow]:
        """The model's logprob of each next prompt token (and the top k) at the chunk's rows,
        a slice of rows at a time: a [rows, vocab] float32 block is large."""
        rows: list[LogprobRow] = []
        for j0 in range(0, len(want.targets), PROMPT_LOGPROB_ROWS):
            targets = want.targets[j0 : j0 + PROMPT_LOGPROB_ROWS]
            logp = self.model.compute_logits(
                hidden[first + j0 : first + j0 + len(targets)]).log_softmax(dim=-1)
            index = torch.tensor(targets, device=logp.device)[:, None]
            chosen = logp.gather(1, index)[:, 0].tolist()
            if want.top_k > 0:
                top_lp, top_ids = (t.tolist() for t in logp.topk(want.top_k, dim=-1))
                rows.extend((c, list(zip(i, v, strict=True)))
                            for c, i, v in zip(chosen, top_ids, top_lp, strict=True))
            else:
                rows.extend((c, []) for c in chosen)
        return rows

    def _sample(self, hidden: torch.Tensor, last_rows: list[int], step: StepInput,
                timer: LayerTimer | None, phase: str) -> StepOutput:
        self.last_timer = timer
        token_ids: list[int] = []
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
        if last_rows:
            first = last_rows[0]
            if last_rows == list(range(first, first + len(last_rows))):
                picked = hidden[first : first + len(last_rows)]  # e.g. every decode row
            else:
                rows = torch.tensor(last_rows, dtype=torch.int64)
                if self.device.type == "cuda":  # a pageable copy would wait for the forward
                    rows = rows.pin_memory()
                picked = hidden[rows.to(self.device, non_blocking=True)]
            logits = self.model.compute_logits(picked)
            sampled = self.sampler(logits, step.sampling, step.generators,
                                   step.histories or None)
            token_ids = sampled.token_ids.tolist()
            logprobs = _logprob_rows(sampled, step.sampling)
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepOutput(
            token_ids=token_ids,
            logprobs=logprobs,
            attention_s=timer.elapsed_s() if timer is not None else None,
            phase=phase,
        )
