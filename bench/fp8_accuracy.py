"""What an FP8 KV cache costs in accuracy: SmolLM2 teacher-forced over text every machine has.

    python -m bench.fp8_accuracy --tokens 4096 --json-out bench/results/cpu-fp8-accuracy-DATE.json

The text is the docstrings of a fixed list of Python standard-library modules (each
module's, then its public classes' and functions' in name order), read at run time with
`inspect.getdoc`, so no one here wrote it; its SHA-256 and the Python version are recorded.
Its first `--tokens` tokens are one prompt, prefilled in chunks with `prompt_logprobs=1`:
every position's logprob of the actual next token and the model's top-1 next token, with
every attention reading K/V back from the cache (the reference backend stores, then
gathers). Each FP8 configuration is compared with the full-precision cache: perplexity,
its ratio, and top-1 agreement (the fraction of positions whose top-1 token is the same).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scheduler.request import SamplingParams
from server.engine import LLM, EngineConfig

STDLIB_MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "pathlib", "re", "textwrap",
    "dataclasses", "typing", "subprocess", "logging", "heapq", "bisect", "string", "shutil",
    "statistics", "fractions", "decimal", "datetime", "inspect", "contextlib", "threading",
)
# (name, --kv-cache-dtype, --kv-cache-scale); the first is the baseline
CONFIGS = (("full", "auto", "per-token-head"), ("fp8/per-token-head", "fp8", "per-token-head"),
           ("fp8/per-tensor", "fp8", "per-tensor"))


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The docstrings of `modules` and of their public classes and functions, in order."""
    parts: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if getattr(value, "__module__", None) != name:
                continue
            doc = inspect.getdoc(value)
            if doc:
                parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def text_record(text: str, **extra: object) -> dict[str, object]:
    """What a result JSON says of the scored text: its source, Python version, size and
    SHA-256 (plus `extra`, e.g. the tokens scored)."""
    return {"source": "docstrings (inspect.getdoc) of Python standard-library modules "
                      "and their public classes and functions, in name order",
            "modules": list(STDLIB_MODULES), "python": sys.version.split()[0],
            "characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            **extra}


@dataclass
class TeacherForced:
    """Per-position results of one run: logprob of the actual token, the top-1 token, and
    the top-1's logprob margin over the second."""

    logprobs: list[float]
    top1: list[int]
    margins: list[float]
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def teacher_forced(tokens: list[int], kv_cache_dtype: str, kv_cache_scale: str,
                   kv_layout: str = "nhd", attention_backend: str = "auto",
                   prepare: Callable[[LLM], None] | None = None) -> TeacherForced:
    """One run over `tokens`; `prepare` sees the engine before it (bench/fp8_ceiling.py
    wraps the pool's store there)."""
    config = EngineConfig(device="cpu", dtype="float32", kv_layout=kv_layout,
                          kv_cache_tokens=len(tokens) + 64, max_model_len=len(tokens) + 8,
                          kv_cache_dtype=kv_cache_dtype, kv_cache_scale=kv_cache_scale,
                          attention_backend=attention_backend, log_stats=False)
    llm = LLM(config)
    if prepare is not None:
        prepare(llm)
    t0 = time.perf_counter()
    result = llm.generate([tokens], SamplingParams(max_tokens=1, temperature=0.0,
                                                   prompt_logprobs=2))[0]
    seconds = time.perf_counter() - t0
    entries = result.prompt_logprobs or []
    scored = [e for e in entries[1:] if e is not None]
    if len(scored) != len(tokens) - 1:
        raise RuntimeError(f"{len(scored)} prompt logprobs for {len(tokens)} tokens")
    return TeacherForced([e.logprob for e in scored], [e.top[0][0] for e in scored],
                         [e.top[0][1] - e.top[1][1] for e in scored], seconds)


MARGIN_BUCKETS = (0.0, 0.1, 0.5, 1.0, 2.0)  # nats: the full-precision top-1 over the second


def compare(tokens: list[int], kv_layout: str = "nhd") -> dict[str, dict[str, object]]:
    """Every configuration of CONFIGS on `tokens`, against the first."""
    runs = {name: teacher_forced(tokens, dtype, scale, kv_layout)
            for name, dtype, scale in CONFIGS}
    return {name: summarize(run, runs[CONFIGS[0][0]]) for name, run in runs.items()}


def summarize(run: TeacherForced, base: TeacherForced) -> dict[str, object]:
    """Perplexity, its ratio, top-1 agreement (overall and by the baseline's margin) and the
    mean absolute logprob difference of `run` against `base`."""
    same = [a == b for a, b in zip(run.top1, base.top1, strict=True)]
    by_margin = {}  # agreement where the baseline's top-1 leads by at least m nats
    for m in MARGIN_BUCKETS:
        kept = [s for s, margin in zip(same, base.margins, strict=True) if margin >= m]
        by_margin[f">={m}"] = {"positions": len(kept),
                               "top1_agreement": sum(kept) / max(1, len(kept))}
    logprob_diff = sum(abs(a - b) for a, b in zip(run.logprobs, base.logprobs, strict=True))
    return {"perplexity": run.perplexity,
            "perplexity_ratio": run.perplexity / base.perplexity,
            "top1_agreement": sum(same) / len(same),
            "mean_abs_logprob_diff": logprob_diff / len(base.logprobs),
            "top1_agreement_by_baseline_margin": by_margin,
            "seconds": run.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text scored (default 4096)")
    p.add_argument("--kv-layout", default="nhd", help="KV layout (default nhd)")
    p.add_argument("--json-out", help="write the results here")
    args = p.parse_args(argv)
    text = stdlib_docstrings()
    probe = LLM(EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=64, log_stats=False))
    tokens = probe.tokenizer.encode(text)[: args.tokens]
    if len(tokens) < args.tokens:
        raise SystemExit(f"the text has only {len(tokens)} tokens")
    rows = compare(tokens, args.kv_layout)
    result = {
        "what": "SmolLM2-135M-Instruct (embedded GGUF, float32, CPU, reference backend), "
                "teacher-forced; each FP8 cache against the full-precision (float32) cache",
        "text": text_record(text, tokens_scored=len(tokens) - 1),
        "kv_layout": args.kv_layout,
        "machine": platform.machine(), "torch": torch.__version__,
        "results": rows,
        "targets": {"fp8/per-token-head": {"perplexity_ratio_max": 1.02,
                                           "top1_agreement_min": 0.97}},
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

