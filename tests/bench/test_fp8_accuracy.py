"""The FP8 accuracy benchmark's short form: SmolLM2 teacher-forced over the first 256 tokens
of the standard library's docstrings, FP8 (per-token-head) against the full-precision
cache. The full 4,096-token measurement is bench/fp8_accuracy.py, its result
bench/results/cpu-fp8-accuracy-2026-12-06.json (docs/kernels.md, "FP8 accuracy")."""

from __future__ import annotations

from bench.fp8_accuracy import stdlib_docstrings, teacher_forced
from tests.server.engine_fixtures import smollm2


def test_fp8_per_token_head_stays_close_to_full_precision() -> None:
    text = stdlib_docstrings()
    tokens = smollm2().tokenizer.encode(text)
    assert len(tokens) >= 4096  # the benchmark's 4,096 tokens exist on every machine
    tokens = tokens[:256]
    full = teacher_forced(tokens, "auto", "per-token-head")
    fp8 = teacher_forced(tokens, "fp8", "per-token-head")
    assert len(fp8.logprobs) == len(tokens) - 1
    agree = sum(a == b for a, b in zip(fp8.top1, full.top1, strict=True)) / len(full.top1)
    assert abs(fp8.perplexity / full.perplexity - 1) < 0.05
    assert agree >= 0.9
    assert fp8.logprobs != full.logprobs  # the cache really was quantized
