"""Requests and their sampling parameters. Pure Python: no torch."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top logprobs per token, sampled or prompt
MAX_LOGIT_BIAS = 100.0  # |bias| at most, as OpenAI's API


class SamplingParamsError(ValueError):
    """An out-of-range sampling parameter; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How one prompt is sampled; the definitions are vLLM's (and OpenAI's where it has them).

    Logits are processed in this order before temperature and the top-k/top-p/min-p filters:
    EOS and `stop_token_ids` masked while fewer than `min_tokens` tokens were generated,
    `logit_bias` added, `repetition_penalty` (over prompt and generated tokens: a positive
    logit divided by it, a negative one multiplied), then `frequency_penalty` x count and
    `presence_penalty` x (count > 0) subtracted (counts over generated tokens only).
    Returned logprobs are the model's, before any of this.

    `n` samples per prompt; with `best_of`, that many are generated and the `n` with the
    highest cumulative logprob are returned (vLLM's legacy semantics). A seeded request's
    i-th sample uses seed + i, so samples differ and each is reproducible.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token; None: none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0
    n: int = 1
    best_of: int | None = None
    prompt_logprobs: int | None = None  # top logprobs per prompt token; None: none

    def validate(self) -> None:
        """Raise SamplingParamsError (a ValueError naming the field) with a user-facing
        message for out-of-range values."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "max_tokens must be at least 1"),
            ("temperature", self.temperature >= 0, "temperature must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "top_k must be -1, 0 (disabled) or positive"),
            ("min_p", 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("repetition_penalty", 0.0 < self.repetition_penalty < float("inf"),
             f"repetition_penalty must be greater than zero, got {self.repetition_penalty}"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got "
             f"{self.min_tokens}"),
            ("n", self.n >= 1, f"n must be at least 1, got {self.n}"),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            checks.append((name, value is None or 0 <= value <= MAX_LOGPROBS,
                           f"{name} must be between 0 and {MAX_LOGPROBS}"))
        for param, ok, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)
        self._validate_logit_bias()
        self._validate_best_of()

    def _validate_logit_bias(self) -> None:
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise SamplingParamsError(f"logit_bias keys must be token ids (integers >= 0), "
                                          f"got {token!r}", "logit_bias")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise SamplingParamsError(
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {bias} for token {token}", "logit_bias")

    def _validate_best_of(self) -> None:
        if self.best_of is None:
            return
        if self.best_of < self.n:
            raise SamplingParamsError(f"best_of must be greater than or equal to n, got "
                                      f"n={self.n} and best_of={self.best_of}", "best_of")
        if self.best_of > self.n and self.greedy:
            raise SamplingParamsError("best_of greater than n needs sampling (temperature > "
                                      "0): greedy candidates are all the same", "best_of")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_samples(self) -> int:
        """Sequences generated per prompt: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """True when the logits are changed before sampling (penalties, bias, min_tokens)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of one of the `num_samples` sequences of a prompt: n = 1, no
        best_of, and seed + index (each sample differs and is reproducible)."""
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return dataclasses.replace(self, n=1, best_of=None, seed=seed)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # client gone, shutdown, or an internal error


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # KV state, owned by the scheduler
    pages: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V is in `pages`
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (last admission)
    num_preemptions: int = 0
    state_slot: int | None = None  # hybrid models: its linear-attention state slot
    # timestamps (time.monotonic) for metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
