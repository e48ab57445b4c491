"""Tokenizer (through transformers) and incremental detokenization for streaming."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat templates; a generation stops at any that exist.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper over a transformers tokenizer with the calls the engine needs."""

    def __init__(self, hf_tokenizer: Any, extra_eos_token_ids: set[int] | None = None) -> None:
        self.hf = hf_tokenizer
        eos: set[int] = set(extra_eos_token_ids or ())
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        vocab = hf_tokenizer.get_vocab()
        special = set(hf_tokenizer.all_special_tokens) | set(
            getattr(hf_tokenizer, "added_tokens_encoder", {})
        )
        for tok in _END_OF_TURN_TOKENS:
            # Only markers the tokenizer treats as special, so a normal word never ends output.
            if tok in vocab and tok in special:
                eos.add(int(vocab[tok]))
        self.eos_token_ids: set[int] = eos

    @classmethod
    def from_pretrained(cls, folder: str | Path, gguf_file: str | None = None) -> Tokenizer:
        return _load_cached(str(folder), gguf_file)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        # No clean-up of spaces: it depends on context, so streamed deltas could not match it.
        return self.hf.decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    chat_template: str | None = None  # overrides the tokenizer's own (--chat-template)

    def with_chat_template(self, template: str) -> Tokenizer:
        """A copy that renders chats with `template` (Jinja) instead of the tokenizer's own;
        the underlying tokenizer, which other engines may share, is left as it is."""
        other = copy.copy(self)
        other.chat_template = template
        return other

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered conversation, ending with the assistant's turn prompt."""
        template = self.chat_template or getattr(self.hf, "chat_template", None)
        if not template:
            raise ValueError("this model's tokenizer has no chat template; use raw prompts "
                             "or start the server with --chat-template")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           chat_template=template)
        return self.encode(text, add_special_tokens=False)


def tokenizer_cache_dir() -> Path:
    root = os.environ.get("ATTNSERVE_CACHE_DIR") or Path.home() / ".cache" / "attnserve"
    return Path(root) / "tokenizers"


def _load_from_gguf(gguf_path: Path) -> Any:
    """Building a tokenizer from GGUF metadata takes seconds; keep a converted copy (keyed by
    the file's path, size and mtime) that loads in a fraction of that."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    cached = tokenizer_cache_dir() / f"{gguf_path.stem}-{key.hexdigest()[:16]}"
    if (cached / "tokenizer_config.json").is_file():
        # The fast class directly: AutoTokenizer's first use scans every model package of
        # transformers (over a second) to find the class that this folder names anyway.
        from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cached))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cached, exc)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        hf.save_pretrained(str(tmp))
        try:
            tmp.rename(cached)  # atomic; a concurrent writer may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        logger.warning("could not cache the tokenizer under %s: %s", cached.parent, exc)
    return hf


@functools.lru_cache(maxsize=8)
def _load_cached(folder: str, gguf_file: str | None) -> Tokenizer:
    t0 = time.perf_counter()
    if gguf_file:
        hf = _load_from_gguf(Path(folder) / gguf_file)
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
    extra: set[int] = set()
    gen_cfg = Path(folder) / "generation_config.json"
    if gguf_file is None and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            extra.update([eos] if isinstance(eos, int) else eos)
    tok = Tokenizer(hf, extra)
    logger.info(
        "tokenizer loaded from %s%s in %.1f s (vocab %d, eos %s)",
        folder,
        f"/{gguf_file}" if gguf_file else "",
        time.perf_counter() - t0,
        tok.vocab_size,
        sorted(tok.eos_token_ids),
    )
    return tok


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes only a sliding window: `prefix` is the tokens [prefix_offset, read_offset) whose
    text was already emitted, and the delta is decode(window + new) minus decode(window).
    Decoding both from the same start keeps SentencePiece's leading-space handling and
    byte-level BPE merges consistent, and a delta ending in U+FFFD (an unfinished multi-byte
    character) is held back until the character completes.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        context_tokens: int = 5,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids or [])
        # Start the window a few prompt tokens back so the first output token's leading
        # space (SentencePiece) decodes as it does in context.
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - context_tokens, 0)
        self.text = ""  # everything emitted so far

    def _widen_window(self) -> str:
        """Move the window start back until its text is non-empty, and return that text.

        A window whose tokens decode to nothing (e.g. a lone SentencePiece word-start marker or
        skipped special tokens) makes the next decode start at a word boundary, which drops
        the leading space the full decode keeps.
        """
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        while not prefix_text and self.prefix_offset > 0:
            self.prefix_offset -= 1
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        return prefix_text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.token_ids.append(int(token_id))
        prefix_text = self._widen_window()
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: emit whatever was held back (e.g. a truly invalid byte)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._widen_window()
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        delta = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta
