"""One step's plan -> the runner's StepInput: the tokens, positions and page tables of every
scheduled chunk, and what sampling needs of the sampled ones (parameters, generators, token
histories for logits processing, prompt-logprob rows); and `InFlightStep`, a launched step
whose tokens the next one may read on the device (overlap scheduling)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.runner import DeferredTokens, PendingStep, PromptLogprobRequest, StepInput
from model.sampler import TokenHistory
from scheduler.plan import PLACEHOLDER_TOKEN, PendingTokens, ScheduledSeq, StepPlan
from scheduler.request import Request


@dataclass
class PreviousSamples:
    """The tokens the step still in flight sampled (overlap scheduling): on the device, and
    which row of them is whose."""

    tokens: torch.Tensor
    row_of: dict[str, int]  # request id -> its row in `tokens`


@dataclass
class InFlightStep:
    """A launched step whose results have not been read (overlap scheduling)."""

    plan: StepPlan
    pending: PendingStep
    sampled_seqs: list[ScheduledSeq]  # read before the scheduler advanced the requests
    values_needed_next: bool  # a sampled request has penalties: the next step needs values
    tokens: PendingTokens = field(default_factory=PendingTokens)  # set by Scheduler.advance

    def previous_samples(self) -> PreviousSamples | None:
        if self.pending.token_ids is None:
            return None
        rows = {seq.request.request_id: k for k, seq in enumerate(self.sampled_seqs)}
        return PreviousSamples(self.pending.token_ids, rows)


def build_step_input(plan: StepPlan, generator_of: Callable[[str], torch.Generator | None],
                     previous: PreviousSamples | None = None) -> StepInput:
    """A request's last token may be a placeholder (the step in flight sampled it): its row
    is read from `previous.tokens` on the device (`DeferredTokens`)."""
    token_ids: list[int] = []
    q_lens, prefix_lens, tables, sample_seqs, sampling, gens = [], [], [], [], [], []
    histories: list[TokenHistory | None] = []
    prompt_lps: list[PromptLogprobRequest] = []
    deferred_rows: list[int] = []
    deferred_sources: list[int] = []
    state_slots: list[int] = []
    state_resets: list[tuple[int, int]] = []
    snapshots: list[list[int]] = []
    for i, seq in enumerate(plan.seqs):
        req = seq.request
        if req.state_slot is not None:  # a hybrid model's request
            state_slots.append(req.state_slot)
            if seq.state_source is not None:
                state_resets.append((req.state_slot, seq.state_source))
            snapshots.append(seq.snapshot_slots)
        ids = req.all_token_ids[seq.start : seq.start + seq.num_tokens]
        if ids and ids[-1] == PLACEHOLDER_TOKEN:
            if previous is None or req.request_id not in previous.row_of:
                raise RuntimeError(f"request {req.request_id}: a placeholder token with no "
                                   "step in flight to take it from")
            deferred_rows.append(len(token_ids) + len(ids) - 1)
            deferred_sources.append(previous.row_of[req.request_id])
            ids[-1] = 0  # the host's stand-in; the device writes the real token over it
        token_ids.extend(ids)
        q_lens.append(seq.num_tokens)
        prefix_lens.append(seq.start)
        tables.append(req.pages)
        wanted = prompt_logprob_request(i, seq)
        if wanted is not None:
            prompt_lps.append(wanted)
        if seq.needs_sample:
            sample_seqs.append(i)
            sampling.append(req.sampling)
            gens.append(generator_of(req.request_id))
            histories.append(token_history(req))
    return StepInput(
        token_ids=token_ids, q_lens=q_lens, prefix_lens=prefix_lens, page_tables=tables,
        num_decodes=plan.num_decodes, sample_seqs=sample_seqs, sampling=sampling,
        generators=gens, histories=histories if any(histories) else [],
        prompt_logprobs=prompt_lps,
        state_slots=state_slots, state_resets=state_resets,
        snapshot_slots=snapshots if any(snapshots) else [],
        deferred=(DeferredTokens(previous.tokens, deferred_rows, deferred_sources)
                  if previous is not None and deferred_rows else None),
    )


def token_history(req: Request) -> TokenHistory | None:
    """What the sampler's logits processing needs of a request, or None if it processes
    nothing: its tokens, and EOS and stop ids while it is under min_tokens (vLLM: with
    ignore_eos, EOS is no stop token and is not held back)."""
    sp = req.sampling
    if not sp.processes_logits:
        return None
    banned: list[int] = []
    if len(req.output_token_ids) < sp.min_tokens:
        banned = list(sp.stop_token_ids)
        if not sp.ignore_eos:
            banned.extend(req.eos_token_ids)
    return TokenHistory(req.prompt_token_ids, req.output_token_ids, banned)


def prompt_logprob_request(index: int, seq: ScheduledSeq) -> PromptLogprobRequest | None:
    """The prompt logprobs this chunk can give (its rows that predict a prompt token), if
    its request asked for them."""
    req = seq.request
    k = req.sampling.prompt_logprobs
    end = min(seq.start + seq.num_tokens, req.num_prompt_tokens - 1)
    if k is None or seq.start >= end:
        return None
    return PromptLogprobRequest(index, k, req.prompt_token_ids[seq.start + 1 : end + 1])
