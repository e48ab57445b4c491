"""What one engine step computes. Pure Python: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import Request


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
