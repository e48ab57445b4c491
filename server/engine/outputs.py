"""What the engine hands back per request per step, and the observer interface for metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from scheduler.config import SchedulerStats
from scheduler.request import Request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """A delta: the tokens and text produced for one request since its previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    arrival_time: float = 0.0  # wall clock (time.time())
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # set when the request failed inside the engine
    # With SamplingParams.prompt_logprobs, on the request's first output only: one entry per
    # prompt token, None for the first (nothing predicts it), else the token's logprob given
    # the tokens before it and the top prompt_logprobs alternatives (vLLM's layout)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class EngineObserver(Protocol):
    """Hooks the engine calls from its own thread; `server/engine/metrics.py` implements them."""

    def on_step(
        self, phase: str, num_tokens: int, step_s: float, attention_s: float | None
    ) -> None: ...

    def on_tokens(self, request: Request, num_new: int, now: float) -> None: ...

    def on_request_finished(self, request: Request, now: float) -> None: ...

    def on_request_failed(self, reason: str) -> None: ...

    def on_preemption(self, count: int) -> None: ...

    def on_gauges(self, num_running: int, num_waiting: int, stats: SchedulerStats) -> None: ...

    def on_kernel_compile(self, count: int, step_s: float) -> None:
        """A step of step_s seconds built `count` kernel instances after start-up."""

    def on_attention_kinds(self, phase: str, seconds: dict[str, float]) -> None:
        """A hybrid model's step: its attention time split by kind (softmax, linear)."""


class NullObserver:
    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None) -> None:
        return None

    def on_tokens(self, request: Request, num_new: int, now: float) -> None:
        return None

    def on_request_finished(self, request: Request, now: float) -> None:
        return None

    def on_request_failed(self, reason: str) -> None:
        return None

    def on_preemption(self, count: int) -> None:
        return None

    def on_gauges(self, num_running: int, num_waiting: int, stats: SchedulerStats) -> None:
        return None

    def on_kernel_compile(self, count: int, step_s: float) -> None:
        return None

    def on_attention_kinds(self, phase: str, seconds: dict[str, float]) -> None:
        return None
