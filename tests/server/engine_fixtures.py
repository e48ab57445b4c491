"""Shared prompts and model loading for the engine tests (the real SmolLM2, float32, CPU)."""

from __future__ import annotations

import functools

import torch

from model.loader import LoadedModel, load_model
from server.engine import LLM, EngineConfig, EngineCore

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Who wrote Hamlet?",
]
LONG_TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines "
    "were programmed by rewiring panels; later came stored programs, assemblers, compilers, "
    "operating systems and networks. Each layer hid the one below and let people think about "
    "bigger problems. "
)


@functools.cache
def smollm2() -> LoadedModel:
    return load_model(None, torch.float32, torch.device("cpu"))


def test_prompts() -> list[list[int]]:
    """8 prompts between 5 and 300 tokens: chat-templated questions and raw text."""
    tok = smollm2().tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts.append(tok.encode("Once upon a time, in a small village,"))
    prompts.append(tok.encode(LONG_TEXT * 3)[:150])
    summary = [{"role": "user", "content": "Summarise: " + LONG_TEXT * 8}]
    prompts.append(tok.apply_chat_template(summary)[:300])
    return prompts


def make_llm(**overrides: object) -> LLM:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=4096)
    for k, v in overrides.items():
        setattr(config, k, v)
    llm = LLM.__new__(LLM)
    llm.engine = EngineCore(config, loaded=smollm2())
    llm.tokenizer = llm.engine.tokenizer
    return llm
