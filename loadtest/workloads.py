"""Workloads: the request trace, built once from a seed so every configuration replays it.

A trace is a list of conversations; single-turn workloads have one turn each. Turn k+1 of
a multi-turn conversation is sent after turn k's answer arrives, carrying the history and
that answer, so only the first turn of each conversation follows the arrival schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.prompts import PromptFactory, TextTokenizer, sample_lengths

WORKLOADS = ("random", "shared-prefix", "multi-turn", "file")
SHARED_PREFIX_ORDERS = ("random", "grouped")


@dataclass
class Turn:
    """One user message: token ids (exact length) or text, and the answer length asked."""

    output_len: int
    prompt_len: int  # tokens of this turn's new content: exact for ids, estimated for text
    token_ids: list[int] | None = None
    text: str | None = None


@dataclass
class Conversation:
    conversation_id: int
    turns: list[Turn]


@dataclass
class WorkloadOptions:
    name: str = "random"
    num_prompts: int = 100
    seed: int = 0
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    shared_prefix_order: str = "random"  # SGLang's: every prompt shuffled; or "grouped"
    turns: int = 3
    file: str | None = None
    token_id_range: tuple[int, int] = (1000, 30000)
    use_token_ids: bool = True  # False when the endpoint needs text (chat) or for multi-turn

    def describe(self) -> dict[str, Any]:
        keys = {
            "random": ("num_prompts", "input_len", "output_len", "range_ratio"),
            "shared-prefix": ("num_groups", "prompts_per_group", "system_prompt_len",
                              "question_len", "output_len", "shared_prefix_order"),
            "multi-turn": ("num_prompts", "turns", "input_len", "output_len", "range_ratio"),
            "file": ("num_prompts", "file"),
        }[self.name]
        out: dict[str, Any] = {"workload": self.name, "seed": self.seed}
        out.update({k: getattr(self, k) for k in keys})
        return out


@dataclass
class Trace:
    conversations: list[Conversation]
    options: WorkloadOptions
    notes: list[str] = field(default_factory=list)

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def _turn(factory: PromptFactory, length: int, output_len: int, use_ids: bool) -> Turn:
    if use_ids:
        return Turn(output_len=output_len, prompt_len=length, token_ids=factory.token_ids(length))
    text = factory.text(length)
    return Turn(output_len=output_len, prompt_len=factory.count_text_tokens(text), text=text)


def _random(opts: WorkloadOptions, factory: PromptFactory, rng: np.random.Generator) -> Trace:
    inputs = sample_lengths(rng, opts.input_len, opts.range_ratio, opts.num_prompts)
    outputs = sample_lengths(rng, opts.output_len, opts.range_ratio, opts.num_prompts)
    convs = [
        Conversation(i, [_turn(factory, n_in, n_out, opts.use_token_ids)])
        for i, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True))
    ]
    return Trace(convs, opts)


def _shared_prefix(opts: WorkloadOptions, factory: PromptFactory,
                   rng: np.random.Generator) -> Trace:
    """Groups of prompts that share a system prompt. SGLang's generated-shared-prefix
    shuffles all prompts, so the groups arrive interleaved ('random', the default);
    'grouped' sends group after group, the easiest order for a prefix cache."""
    if opts.shared_prefix_order not in SHARED_PREFIX_ORDERS:
        raise ValueError(f"unknown shared-prefix order {opts.shared_prefix_order!r}; choose "
                         f"from {', '.join(SHARED_PREFIX_ORDERS)}")
    turns: list[Turn] = []
    for _ in range(opts.num_groups):
        if opts.use_token_ids:
            system_ids = factory.token_ids(opts.system_prompt_len)
            for _ in range(opts.prompts_per_group):
                ids = system_ids + factory.token_ids(opts.question_len)
                turns.append(Turn(opts.output_len, len(ids), token_ids=ids))
        else:
            system_text = factory.text(opts.system_prompt_len)
            for _ in range(opts.prompts_per_group):
                text = f"{system_text}\n\n{factory.text(opts.question_len)}"
                turns.append(Turn(opts.output_len, factory.count_text_tokens(text), text=text))
    if opts.shared_prefix_order == "random":
        turns = [turns[i] for i in rng.permutation(len(turns))]
    return Trace([Conversation(i, [turn]) for i, turn in enumerate(turns)], opts)


def _multi_turn(opts: WorkloadOptions, factory: PromptFactory, rng: np.random.Generator) -> Trace:
    if opts.turns < 1:
        raise ValueError("--turns must be >= 1")
    n = opts.num_prompts * opts.turns
    inputs = sample_lengths(rng, opts.input_len, opts.range_ratio, n)
    outputs = sample_lengths(rng, opts.output_len, opts.range_ratio, n)
    convs = []
    for c in range(opts.num_prompts):
        span = range(c * opts.turns, (c + 1) * opts.turns)
        # History is re-sent as text (the previous answers arrive as text), so turns are text.
        convs.append(Conversation(c, [_turn(factory, inputs[i], outputs[i], False) for i in span]))
    notes = ["multi-turn prompts are text; lengths are estimates unless --tokenizer is given"]
    return Trace(convs, opts, notes)


def _from_file(opts: WorkloadOptions, factory: PromptFactory) -> Trace:
    """JSONL lines: {"prompt": str | [ids], "output_len": int} ("max_tokens" also accepted)."""
    if not opts.file:
        raise ValueError("--workload file needs --file PATH")
    convs: list[Conversation] = []
    lines = Path(opts.file).read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if len(convs) >= opts.num_prompts:
            break
        row = json.loads(line)
        output_len = int(row.get("output_len", row.get("max_tokens", opts.output_len)))
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            ids = [int(t) for t in prompt]
            if opts.use_token_ids:
                turn = Turn(output_len, len(ids), token_ids=ids)
            elif factory.tokenizer is not None:
                turn = Turn(output_len, len(ids), text=factory.tokenizer.decode(ids))
            else:
                raise ValueError(f"{opts.file}:{lineno}: token-id prompts on a text endpoint "
                                 "need --tokenizer")
        elif isinstance(prompt, str):
            turn = Turn(output_len, int(row.get("prompt_len", factory.count_text_tokens(prompt))),
                        text=prompt)
        else:
            raise ValueError(f"{opts.file}:{lineno}: 'prompt' must be a string or a list of ids")
        convs.append(Conversation(len(convs), [turn]))
    if not convs:
        raise ValueError(f"{opts.file} holds no prompts")
    notes = []
    if len(convs) < opts.num_prompts:
        notes.append(f"{opts.file} holds {len(convs)} prompts, fewer than --num-prompts")
    return Trace(convs, opts, notes)


def build_trace(opts: WorkloadOptions, tokenizer: TextTokenizer | None = None) -> Trace:
    """The trace for ``opts``; the same options and seed always give the same trace."""
    rng = np.random.default_rng(opts.seed)
    factory = PromptFactory(rng, opts.token_id_range, tokenizer)
    if opts.name == "random":
        return _random(opts, factory, rng)
    if opts.name == "shared-prefix":
        return _shared_prefix(opts, factory, rng)
    if opts.name == "multi-turn":
        return _multi_turn(opts, factory, rng)
    if opts.name == "file":
        return _from_file(opts, factory)
    raise ValueError(f"unknown workload {opts.name!r}; choose from {', '.join(WORKLOADS)}")
