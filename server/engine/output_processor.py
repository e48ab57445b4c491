"""From sampled tokens to RequestOutputs: incremental detokenization, stop strings and the
text held back while one may be starting, logprobs, and delivery to each request's sink.

Runs on the engine's step thread, like the rest of EngineCore; it owns the per-request state
that lives as long as the engine tracks the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.plan import ScheduledSeq
from scheduler.request import FinishReason, Request
from server.engine.outputs import EngineObserver, RequestOutput, TokenLogprob

OutputSink = Callable[[RequestOutput], None]
# One sampled token's (logprob, top (token id, logprob) pairs), or None without logprobs.
SampledLogprob = tuple[float, list[tuple[int, float]]] | None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string: that much text is
    held back from the stream until the stop string completes or cannot."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


@dataclass
class _Tracked:
    request: Request
    sink: OutputSink | None
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    text: str = ""
    emitted_text_len: int = 0
    # position -> logprob of that prompt token (SamplingParams.prompt_logprobs), until sent
    prompt_logprobs: dict[int, TokenLogprob] | None = None
    prompt_logprobs_sent: bool = False
    wall_offset: float = 0.0  # time.time() - time.monotonic() at arrival


class OutputProcessor:
    """The requests the engine tracks, and everything that turns their tokens into outputs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._tracked: dict[str, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracked

    def add(self, req: Request, sink: OutputSink | None, generator: torch.Generator | None) -> None:
        self._tracked[req.request_id] = self._new(req, sink, generator)

    def _new(self, req: Request, sink: OutputSink | None,
             generator: torch.Generator | None) -> _Tracked:
        return _Tracked(
            request=req, sink=sink, detok=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids),
            generator=generator, wall_offset=time.time() - time.monotonic(),
        )

    def add_prompt_logprobs(self, request_id: str, first_position: int,
                            rows: list[tuple[float, list[tuple[int, float]]]]) -> None:
        """Logprobs of the prompt tokens at first_position, first_position + 1, ... (a
        recomputed chunk after a preemption repeats positions: the first value is kept)."""
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.prompt_logprobs_sent:
            return
        if tracked.prompt_logprobs is None:
            tracked.prompt_logprobs = {}
        prompt = tracked.request.prompt_token_ids
        for j, (lp, top) in enumerate(rows):
            pos = first_position + j
            tracked.prompt_logprobs.setdefault(pos, TokenLogprob(prompt[pos], lp, top))

    def generator(self, request_id: str) -> torch.Generator | None:
        """The request's own sampling generator (a seeded request's), or None."""
        return self._tracked[request_id].generator

    def process(
        self, sampled_seqs: list[ScheduledSeq], sampled: list[int], logprobs: list[SampledLogprob],
        finished: list[Request], now: float, observer: EngineObserver,
    ) -> tuple[list[RequestOutput], list[str]]:
        """One step's outputs, one per sampled sequence still tracked, and the ids of the
        requests a stop string ended: the caller finishes those in the scheduler."""
        outputs: list[RequestOutput] = []
        stopped: list[str] = []
        finished_ids = {r.request_id for r in finished}
        for k, seq in enumerate(sampled_seqs):
            token, lp = sampled[k], (logprobs[k] if k < len(logprobs) else None)
            req = seq.request
            tracked = self._tracked.get(req.request_id)
            if tracked is None:
                continue
            observer.on_tokens(req, 1, now)
            stop_hit = self._append_text(tracked, token)
            done = req.request_id in finished_ids
            if stop_hit and not done:
                stopped.append(req.request_id)
                done = True
            new_lps = [TokenLogprob(token, lp[0], lp[1])] if lp is not None else []
            if done:
                reason = FinishReason.STOP if stop_hit else (req.finish_reason or FinishReason.STOP)
                req.finished_time = now
                observer.on_request_finished(req, now)
                del self._tracked[req.request_id]
                outputs.append(self._emit(tracked, [token], new_lps, True, reason.value))
            else:
                outputs.append(self._emit(tracked, [token], new_lps, False, None))
        return outputs, stopped

    def abort(self, request_id: str, observer: EngineObserver) -> RequestOutput | None:
        """End a tracked request with finish_reason abort (its last output); None if untracked."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        tracked.request.finished_time = time.monotonic()
        observer.on_request_finished(tracked.request, tracked.request.finished_time)
        return self._emit(tracked, [], [], finished=True, reason=FinishReason.ABORT.value)

    def fail(self, request_id: str, message: str, observer: EngineObserver) -> RequestOutput | None:
        """End a tracked request with an error (counted as a failure); None if untracked."""
        tracked = self._tracked.pop(request_id, None)
        return None if tracked is None else self._emit_failure(tracked, message, observer)

    def reject(self, req: Request, sink: OutputSink | None, message: str,
               observer: EngineObserver) -> RequestOutput:
        """Fail a request that was never tracked (the scheduler refused it)."""
        return self._emit_failure(self._new(req, sink, None), message, observer)

    def _emit_failure(self, tracked: _Tracked, message: str, observer: EngineObserver) -> RequestOutput:
        observer.on_request_failed("error")
        return self._emit(tracked, [], [], True, FinishReason.ABORT.value, error=message)

    def _append_text(self, tracked: _Tracked, token: int) -> bool:
        """Detokenize one token; True when a stop string completed (text cut before it)."""
        req = tracked.request
        is_eos = token in req.eos_token_ids and not req.sampling.ignore_eos
        if is_eos or token in req.sampling.stop_token_ids:
            return False  # stop tokens are not part of the text
        prev_len = len(tracked.text)
        tracked.text += tracked.detok.add(token)
        if len(req.output_token_ids) <= req.sampling.min_tokens:
            return False  # as vLLM: stop strings count only after min_tokens tokens
        for stop in req.sampling.stop:
            pos = tracked.text.find(stop, max(0, prev_len - len(stop) + 1))
            if pos != -1:
                tracked.text = tracked.text[:pos]
                return True
        return False

    def _emit(
        self, tracked: _Tracked, tokens: list[int], lps: list[TokenLogprob], finished: bool,
        reason: str | None, error: str | None = None,
    ) -> RequestOutput:
        req = tracked.request
        end = len(tracked.text) if finished else len(tracked.text) - _stop_prefix_len(
            tracked.text, req.sampling.stop)
        end = max(end, tracked.emitted_text_len)
        new_text = tracked.text[tracked.emitted_text_len : end]
        if finished and reason != "stop":
            new_text += tracked.detok.flush()
        tracked.emitted_text_len = end
        off = tracked.wall_offset
        prompt_lps = None
        if tracked.prompt_logprobs is not None and (tokens or finished):
            got = tracked.prompt_logprobs
            prompt_lps = [None] + [got.get(p) for p in range(1, req.num_prompt_tokens)]
            tracked.prompt_logprobs, tracked.prompt_logprobs_sent = None, True
        out = RequestOutput(
            request_id=req.request_id, new_token_ids=tokens, new_text=new_text, finished=finished,
            finish_reason=reason, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids), num_cached_tokens=req.num_cached_tokens,
            new_logprobs=lps, arrival_time=req.arrival_time + off,
            first_token_time=req.first_token_time + off if req.first_token_time else None,
            finish_time=time.monotonic() + off if finished else None, error=error,
            prompt_logprobs=prompt_lps,
        )
        if tracked.sink is not None:
            tracked.sink(out)
        return out
