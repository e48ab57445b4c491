"""The offline Python API: `LLM(...).generate(prompts, SamplingParams)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from scheduler.request import SamplingParams
from server.engine.choices import ChoiceGroup
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.outputs import RequestOutput, TokenLogprob


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked for
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class LLM:
    """Runs the engine in the caller's thread until every submitted prompt has finished."""

    def __init__(self, config: EngineConfig | None = None, **overrides: object) -> None:
        config = config or EngineConfig()
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown engine option {key!r}")
            setattr(config, key, value)
        self.engine = EngineCore(config)
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop what the engine started outside this process (tensor-parallel ranks)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def encode_prompt(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
        chat: bool = False,
        progress: bool = False,
    ) -> list[Completion]:
        """One Completion per choice: prompt i's n samples follow each other (with n = 1,
        one per prompt, in order)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        groups: list[tuple[ChoiceGroup, list[Completion]]] = []
        owner: dict[str, tuple[int, int]] = {}  # engine request id -> (group, its index)
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.encode_prompt(prompt, chat)
            group = self.engine.add_choice_group([ids], p)
            groups.append((group, [Completion(prompt_token_ids=ids) for _ in range(p.n)]))
            for k, rid in enumerate(group.request_ids):
                owner[rid] = (len(groups) - 1, k)
        bar = tqdm(total=len(owner), desc="generate", disable=not progress, unit="req")
        while self.engine.has_unfinished():
            for out in self.engine.step():
                g, k = owner[out.request_id]
                group, completions = groups[g]
                for choice, choice_out in group.add(k, out):
                    self._merge(completions[choice], choice_out)
                if out.finished:
                    bar.update(1)
        bar.close()
        return [c for _, completions in groups for c in completions]

    @staticmethod
    def _merge(c: Completion, out: RequestOutput) -> None:
        c.token_ids.extend(out.new_token_ids)
        c.text += out.new_text
        c.logprobs.extend(out.new_logprobs)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.arrival_time = out.arrival_time
        c.first_token_time = out.first_token_time
        c.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            c.finish_reason = out.finish_reason
            c.finish_time = out.finish_time
            if out.error:
                raise RuntimeError(out.error)
