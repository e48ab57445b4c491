"""Incremental detokenization: multi-byte UTF-8, leading spaces, equality with full decode."""

from __future__ import annotations

import random

import pytest

from model.loader import embedded_tokenizer
from model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 🎉🚀👩‍👩‍👧 and CJK: 你好，世界。東京タワー",
    "Mixed   spacing\n\nnew lines\tand tabs — dashes… «quotes» ñandú",
    "  leading spaces and trailing  ",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Tokenizer:
    """A small Llama-style (SentencePiece: '▁' spaces, byte fallback) tokenizer trained here."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    raw.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"),
    )
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20] + TEXTS,
                            trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    return Tokenizer(hf)


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> tuple[str, list]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    return "".join(deltas), deltas


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "sentencepiece_tokenizer"])
def test_stream_equals_full_decode_for_texts(which, request):
    tok: Tokenizer = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for cut in (0, 1, len(ids) // 2):  # prompt = first `cut` tokens
            out, deltas = stream(tok, ids[cut:], ids[:cut])
            full = tok.decode(ids)
            assert tok.decode(ids[:cut]) + out == full, (text, cut)
            # never a replacement character from a split multi-byte character
            assert all("\ufffd" not in d for d in deltas), deltas


def test_multibyte_characters_emitted_once_complete(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for ch in ["🎉", "👩‍👩‍👧", "你好", "東京"]:
        ids = tok.encode(ch, add_special_tokens=False)
        assert len(ids) > 1 or len(ch.encode()) <= 2  # byte-level BPE splits these
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add(t) for t in ids]
        assert "".join(deltas) == ch
        assert all("\ufffd" not in d for d in deltas)
    # A lone 4-byte emoji split over tokens: nothing until its last byte, then all of it.
    ids = tok.encode("🚀", add_special_tokens=False)
    if len(ids) > 1:
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add(t) for t in ids]
        assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🚀"


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "sentencepiece_tokenizer"])
def test_random_token_sequences_equal_full_decode(which, request):
    tok: Tokenizer = request.getfixturevalue(which)
    rng = random.Random()
    vocab = tok.vocab_size
    for _ in range(30):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        out, _ = stream(tok, ids, prompt)
        assert out == tok.decode(prompt + ids)[len(tok.decode(prompt)):], (prompt, ids)


def test_sentencepiece_leading_space_of_first_generated_token(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]) == "the quick")
    # Decoded alone, the continuation loses its leading space (SentencePiece strips it) ...
    assert tok.decode(ids[cut:]) == "brown fox"
    # ... but streamed after the prompt it must keep it.
    out, _ = stream(tok, ids[cut:], ids[:cut])
    assert out == " brown fox"


def test_chat_template_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in tok.eos_token_ids
    assert tok.vocab_size == 49152
