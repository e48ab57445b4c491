"""Prompt material: random token ids of exact length, and text for endpoints that need text.

Token-id prompts have an exact length for the server's tokenizer (the ids are sent as
they are). Text needs a tokenizer to be length-exact; with ``--tokenizer`` the text is
the decoding of random ids (as SGLang's generators do), otherwise it is made of common
English words at roughly one token each, and lengths are approximate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Ids far from both ends of a 49152-entry vocabulary (SmolLM2): no special tokens at the
# start, no rarely trained merges at the end.
DEFAULT_TOKEN_ID_RANGE = (1000, 30000)

# Short, frequent words: nearly every BPE tokenizer keeps " word" as one token.
_COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their been has would when "
    "who will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same "
    "another know while last might us great old year off come since against go came right "
    "used take three small found place house part water light river city green market table"
).split()


@dataclass
class TextTokenizer:
    """A Hugging Face tokenizer loaded by name, folder, or GGUF file path."""

    tokenizer: Any

    @classmethod
    def load(cls, name_or_path: str) -> TextTokenizer:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # the client must run without transformers too
            raise RuntimeError("--tokenizer needs the 'transformers' package") from exc
        if name_or_path.endswith(".gguf"):
            folder, filename = os.path.split(os.path.abspath(name_or_path))
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        else:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class PromptFactory:
    """Draws prompt pieces of a given token length from one seeded generator."""

    rng: np.random.Generator
    token_id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE
    tokenizer: TextTokenizer | None = None

    def token_ids(self, length: int) -> list[int]:
        low, high = self.token_id_range
        return self.rng.integers(low, high, size=length).tolist()

    def text(self, length: int) -> str:
        """Text of about ``length`` tokens (exactly, for most tokenizers, with one given)."""
        if length <= 0:
            return ""
        if self.tokenizer is not None:
            return self.tokenizer.decode(self.token_ids(length))
        picks = self.rng.integers(0, len(_COMMON_WORDS), size=length)
        return " ".join(_COMMON_WORDS[i] for i in picks)

    def count_text_tokens(self, text: str) -> int:
        """Token count of text: exact with a tokenizer, else the word count."""
        if self.tokenizer is not None:
            return self.tokenizer.count(text)
        return len(text.split())


def sample_lengths(
    rng: np.random.Generator, mean: int, range_ratio: float, size: int
) -> list[int]:
    """Lengths uniform in [mean * (1 - r), mean * (1 + r)], as vLLM's random dataset does."""
    if not 0 <= range_ratio < 1:
        raise ValueError("--range-ratio must be in [0, 1)")
    low = max(1, int(mean * (1 - range_ratio)))
    high = max(low, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=size).tolist()
