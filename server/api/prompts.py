"""Prompts to token ids, off the event loop, behind a length bound that costs nothing.

Tokenizing a megabyte of text takes about half a second and chat templating runs Jinja:
done on the event loop, either stalls every other connection (/health, running streams).
So both run on a small thread pool (the fast tokenizers release the GIL while encoding).

Before that, a text longer than any prompt the context can hold is refused without being
tokenized. The bound: a token never covers more characters than the longest decoded token
of the vocabulary, in UTF-8 bytes (bytes >= characters), plus one for the word-start
marker that a single-token decode drops in SentencePiece vocabularies. So a text of more
than `max_model_len x that` characters has more than `max_model_len` tokens. This holds for
tokenizers that keep every character of the input (byte-level BPE, SentencePiece BPE: the
Llama family); SmolLM2's longest token is 81 bytes, so at a context of 8192 tokens the bound
is 671,744 characters.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from server.api.errors import APIError, bad_request
from server.engine import EngineCore

T = TypeVar("T")
# longest decoded token (UTF-8 bytes) per tokenizer object: computed once, ~0.2 s for 49k ids
_LONGEST_TOKEN: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()


def longest_token_bytes(core: EngineCore) -> int:
    tokenizer = core.tokenizer
    cached = _LONGEST_TOKEN.get(tokenizer)
    if cached is None:
        cached = max(len(tokenizer.decode([i], skip_special_tokens=False).encode())
                     for i in range(tokenizer.vocab_size))
        _LONGEST_TOKEN[tokenizer] = cached
    return cached


class PromptEncoder:
    """Tokenizes prompts and renders chats for one engine, on `pool`."""

    def __init__(self, core: EngineCore, pool: Executor) -> None:
        self.core = core
        self.pool = pool
        self.max_chars_per_token = longest_token_bytes(core) + 1
        self.max_prompt_chars = core.max_model_len * self.max_chars_per_token

    async def encode_prompts(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        """Token ids of each prompt: texts are tokenized as offline `generate` does (raw)."""
        for p in prompts:
            if isinstance(p, str):
                self._check_length(len(p), "prompt")
        if all(isinstance(p, list) for p in prompts):
            encoded = [list(p) for p in prompts]
        else:
            encoded = await self._off_loop(lambda: [
                list(p) if isinstance(p, list) else self.core.tokenizer.encode(p)
                for p in prompts])
        if any(not ids for ids in encoded):
            raise bad_request("a prompt encodes to no tokens", "prompt")
        return encoded

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            return await self._off_loop(lambda: self.core.tokenizer.apply_chat_template(messages))
        except ValueError as e:  # no chat template, or the template refused the conversation
            raise bad_request(str(e), "messages") from None

    def _check_length(self, num_chars: int, param: str) -> None:
        if num_chars > self.max_prompt_chars:
            raise APIError(
                400, f"the prompt is {num_chars} characters long; this model's context of "
                     f"{self.core.max_model_len} tokens holds at most {self.max_prompt_chars} "
                     "characters", "invalid_request_error", param, "prompt_too_long",
                metric_reason="validation")

    async def _off_loop(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)
