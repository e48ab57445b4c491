"""n and best_of: the engine requests behind one API request, and how their outputs become
the API's choices.

A request of P prompts with `n` samples (or `best_of` candidates) each runs as P x
num_samples independent engine requests; those of one prompt share its pages through the
prefix cache, so the prompt is computed once (all but its last, partial page: each
sample computes that itself; docs/architecture.md). Engine request k belongs to prompt
k // num_samples. Choice i of the response is prompt i // n's sample i % n, as in vLLM
and OpenAI.

Without best_of (or best_of == n), every output passes straight through with its index:
streaming works as for one prompt. With best_of > n, a prompt's candidates are held until
all have finished; then the n with the highest cumulative logprob (the sum of the model's
log-probabilities of their tokens, vLLM's legacy ranking) are emitted, each as one final
output carrying its whole text. Candidates compute logprobs for that ranking; they are
removed again when the request did not ask for them.
"""

from __future__ import annotations

import dataclasses
import math

from scheduler.request import SamplingParams
from server.engine.outputs import RequestOutput


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """One output holding every delta of a finished engine request."""
    last = outputs[-1]
    return dataclasses.replace(
        last,
        new_token_ids=[t for o in outputs for t in o.new_token_ids],
        new_text="".join(o.new_text for o in outputs),
        new_logprobs=[lp for o in outputs for lp in o.new_logprobs],
        first_token_time=next((o.first_token_time for o in outputs if o.first_token_time),
                              None),
    )


def cumulative_logprob(out: RequestOutput) -> float:
    """Sum of the logprobs of a merged output's tokens; -inf for a failed one."""
    if out.error:
        return -math.inf
    return sum(lp.logprob for lp in out.new_logprobs)


class ChoiceGroup:
    """The engine requests of one API request and the choices their outputs become."""

    def __init__(self, base_id: str, num_prompts: int, params: SamplingParams) -> None:
        self.params = params
        self.num_prompts = num_prompts
        self.per_prompt = params.num_samples
        self.n = params.n
        self.ranked = self.per_prompt > self.n  # best_of > n: hold and rank
        total = num_prompts * self.per_prompt
        self.request_ids = [base_id] if total == 1 else [f"{base_id}-{k}" for k in range(total)]
        self._held: dict[int, list[RequestOutput]] = {}  # engine request index -> its deltas
        self._finished_per_prompt = [0] * num_prompts

    @property
    def num_choices(self) -> int:
        return self.num_prompts * self.n

    def engine_params(self) -> list[SamplingParams]:
        """One SamplingParams per engine request (n = 1, seed + sample index)."""
        out = []
        for k in range(len(self.request_ids)):
            child = self.params.for_sample(k % self.per_prompt)
            if self.ranked and child.logprobs is None:
                child = dataclasses.replace(child, logprobs=0)  # for the ranking
            out.append(child)
        return out

    def expand_prompts(self, prompts: list[list[int]]) -> list[list[int]]:
        """Each prompt repeated for its samples, in engine-request order."""
        if len(prompts) != self.num_prompts:
            raise ValueError(f"{len(prompts)} prompts for a group of {self.num_prompts}")
        return [p for p in prompts for _ in range(self.per_prompt)]

    def add(self, index: int, out: RequestOutput) -> list[tuple[int, RequestOutput]]:
        """Engine request `index` produced `out`: the (choice index, output) pairs now due."""
        if not self.ranked:
            return [(index, out)]
        self._held.setdefault(index, []).append(out)
        if not out.finished:
            return []
        prompt = index // self.per_prompt
        self._finished_per_prompt[prompt] += 1
        if self._finished_per_prompt[prompt] < self.per_prompt:
            return []
        first = prompt * self.per_prompt
        candidates = [_merge(self._held.pop(k)) for k in range(first, first + self.per_prompt)]
        best = sorted(candidates, key=cumulative_logprob, reverse=True)[: self.n]
        if self.params.logprobs is None:
            best = [dataclasses.replace(o, new_logprobs=[]) for o in best]
        return [(prompt * self.n + rank, o) for rank, o in enumerate(best)]
