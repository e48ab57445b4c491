"""The model runner of each tensor-parallel rank.

Rank 0 (the server process) schedules: page ids, the radix cache and the batch are decided
once, there. `LeaderRunner.launch` sends the step's host inputs to the other ranks
(channel.py) and then runs the step as `ModelRunner` does; each `FollowerRunner` runs the
same step on its shard. The collectives inside the forward pass keep the ranks in step.
Logits are all-gathered (every rank computes its vocabulary rows), rank 0 samples, and the
sampled tokens are broadcast from it on the device: a follower never samples, and the next
step's deferred input tokens (overlap scheduling) are the broadcast copy on every rank.

Calls that run collectives outside a step (warm-up, CUDA-graph capture, a change of the
attention-timing mode, a benchmark's timed parts) are made on every rank: rank 0 sends the
call, then makes it itself; its own steps inside such a call are not sent again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from attention.base import AttentionBackend
from model.parallel.channel import StepChannel, TensorParallelError, receive
from model.parallel.group import TPGroup
from model.runner import DeferredTokens, ModelRunner, PendingStep, StepInput
from model.sampler import Sampler, SamplerOutput, TokenHistory
from scheduler.request import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

# ModelRunner methods that run collectives outside `launch`, made on every rank
MIRRORED_CALLS = frozenset({"warm_up", "enable_cuda_graphs", "set_attention_timing",
                            "forward_only"})


class LeaderSampler(Sampler):
    """Rank 0's sampler: samples the gathered logits, then broadcasts the tokens."""

    def __init__(self, group: TPGroup) -> None:
        super().__init__()
        self.tp = group

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None] | None = None,
                 histories: Sequence[TokenHistory | None] | None = None) -> SamplerOutput:
        out = super().__call__(logits, params, generators, histories)
        self.tp.broadcast(out.token_ids)
        return out


class FollowerSampler(Sampler):
    """A follower's sampler: rank 0's tokens, received by broadcast."""

    def __init__(self, group: TPGroup) -> None:
        super().__init__()
        self.tp = group

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None] | None = None,
                 histories: Sequence[TokenHistory | None] | None = None) -> SamplerOutput:
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
        return SamplerOutput(token_ids=self.tp.broadcast(tokens))


def follower_step(step: StepInput) -> StepInput:
    """What a follower needs of a step: no generators or token histories (only rank 0
    samples), and the deferred tokens' rows without rank 0's tensor (each rank has its own
    broadcast copy)."""
    deferred = None
    if step.deferred is not None:
        deferred = DeferredTokens(None, step.deferred.rows,  # type: ignore[arg-type]
                                  step.deferred.sources)
    return dataclasses.replace(step, generators=[None] * len(step.generators), histories=[],
                               deferred=deferred)


class LeaderRunner(ModelRunner):
    """Rank 0's runner: every step and every mirrored call is sent to the followers first.
    `on_failure` hears of a step that failed on rank 0 after it was sent (the followers are
    then out of step with it, and the group cannot serve on) and returns the reason to
    report."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, device: torch.device,
                 page_size: int, group: TPGroup, channel: StepChannel) -> None:
        super().__init__(model, backend, device, page_size)
        self.tp = group
        self.channel = channel
        self.sampler = LeaderSampler(group)
        self.on_failure: Callable[[str], str] | None = None
        self._mirrored = False  # inside a call every rank makes: steps are not sent

    def launch(self, step: StepInput) -> PendingStep:
        if self._mirrored:
            return super().launch(step)
        self.channel.send(("launch", follower_step(step)))
        try:
            return super().launch(step)
        except Exception as e:
            raise self._fail(f"rank 0 failed a step the other ranks run: "
                             f"{type(e).__name__}: {e}") from e

    def warm_up(self) -> None:
        self._on_every_rank("warm_up")

    def enable_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        self._on_every_rank("enable_cuda_graphs", max_batch, max_model_len)

    def set_attention_timing(self, mode: Any) -> None:
        self._on_every_rank("set_attention_timing", mode)

    def forward_only(self, step: StepInput) -> tuple[torch.Tensor, bool]:
        if self._mirrored:
            return super().forward_only(step)
        self.channel.send(("call", "forward_only", (follower_step(step),)))
        return self._mirror(lambda: ModelRunner.forward_only(self, step))

    def call_on_every_rank(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(runner, *args)` on every rank (a module-level function: it is pickled by
        name; a StepInput argument reaches the followers as `follower_step` makes it, without
        its deferred tokens); rank 0's result."""
        sent = tuple(dataclasses.replace(follower_step(a), deferred=None)
                     if isinstance(a, StepInput) else a for a in args)
        self.channel.send(("run", fn, sent))
        return self._mirror(lambda: fn(self, *args))

    def stop_followers(self) -> None:
        self.channel.send(("stop",))

    def _on_every_rank(self, name: str, *args: Any) -> Any:
        self.channel.send(("call", name, args))
        return self._mirror(lambda: getattr(ModelRunner, name)(self, *args))

    def _mirror(self, call: Callable[[], T]) -> T:
        self._mirrored = True
        try:
            return call()
        except Exception as e:
            raise self._fail(f"rank 0 failed a call the other ranks make: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            self._mirrored = False

    def _fail(self, reason: str) -> TensorParallelError:
        """The error to raise: the reason `on_failure` settles on (e.g. which rank died)."""
        if self.on_failure is not None:
            reason = self.on_failure(reason)
        return TensorParallelError(reason)


class FollowerRunner(ModelRunner):
    """Ranks 1..N-1: `follow` runs what rank 0 sends until it says stop or is gone."""

    def __init__(self, model: torch.nn.Module, backend: AttentionBackend, device: torch.device,
                 page_size: int, group: TPGroup) -> None:
        super().__init__(model, backend, device, page_size)
        self.tp = group
        self.sampler = FollowerSampler(group)
        self.last_tokens: torch.Tensor | None = None  # the last step's tokens (rank 0's)

    def follow(self, conn: Any) -> None:
        """Serve rank 0's messages; returns on "stop" or when rank 0's end closes."""
        while True:
            try:
                message = receive(conn)
            except EOFError:
                logger.warning("rank %d: rank 0 is gone; stopping", self.tp.rank)
                return
            kind = message[0]
            if kind == "stop":
                return
            if kind == "launch":
                self._launch_as_sent(message[1])
            elif kind == "call":
                name, args = message[1], message[2]
                if name not in MIRRORED_CALLS:
                    raise TensorParallelError(f"rank 0 sent an unknown call {name!r}")
                if name == "forward_only":  # its deferred tokens are values: not needed
                    args = (dataclasses.replace(args[0], deferred=None),)
                getattr(ModelRunner, name)(self, *args)
            elif kind == "run":
                message[1](self, *message[2])
            else:
                raise TensorParallelError(f"rank 0 sent an unknown message {kind!r}")

    def _launch_as_sent(self, step: StepInput) -> None:
        if step.deferred is not None:
            if self.last_tokens is None:
                raise TensorParallelError("a step reads the previous step's tokens, and "
                                          "this rank has none")
            step.deferred.tokens = self.last_tokens
        self.last_tokens = self.launch(step).token_ids
