"""What one engine step computes. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import Request

# An output token sampled by a step whose result is still on the device (overlap
# scheduling): the request counts it, the next step reads its value on the device, and
# `Scheduler.resolve` writes the value in before anything on the host reads it.
PLACEHOLDER_TOKEN = -1


@dataclass
class ScheduledSeq:
    """`num_tokens` new tokens of `request`, starting at position `start`.

    Before `schedule()` returns, `request.pages` already covers start + num_tokens tokens.
    `needs_sample` is true when this chunk reaches the end of the known tokens, so the
    step's logits for its last token are sampled.
    """

    request: Request
    start: int
    num_tokens: int
    # hybrid models: where the request's state slot starts from when it is (re)admitted in
    # this step (a prefix snapshot's slot, or -1: zeros; None: it carries on), and the slots
    # for the state snapshots at the snapshot points this chunk crosses (-1: not kept)
    state_source: int | None = None
    snapshot_slots: list[int] = field(default_factory=list)

    @property
    def needs_sample(self) -> bool:
        return self.start + self.num_tokens == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start == self.request.num_tokens - 1 \
            and bool(self.request.output_token_ids)


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Request] = field(default_factory=list)
    num_decodes: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class PendingTokens:
    """A step applied by `Scheduler.advance` whose tokens are not known yet: one slot per
    sampled sequence (its request and the index of its placeholder, or None when the request
    had ended before the step's results were applied), and the requests that finished on
    length alone."""

    slots: list[tuple[Request, int] | None] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
