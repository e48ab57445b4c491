"""How much does timing attention cost? Step time with attention timed on every step vs never.

    python -m bench.metrics_timing_overhead [--device cpu] [--model M] [--reps 6] [--batch 4]
        [--tokens 32] [--tokenizer-folder DIR]

Runs the offline engine (one model load) on the same greedy batch, alternating between
`attention_timing_every=1` and "never" so that drift (thermal, other processes) hits both
modes alike. Every engine step's wall time comes from the observer hook. The overhead of
one timed step is the difference of the median step times, per phase; with timing on
every Nth step the average overhead is that difference / N. The recommended N is the
smallest one that keeps it under the target fraction (1%) of the median step time.

Prompts are seeded random token ids, so a synthetic preset (`--model smollm2-135m`, the
same shapes as the embedded model) runs where the GGUF file is absent; the engine still
needs a tokenizer (EOS ids, detokenization), which `--tokenizer-folder` can give as a saved
Hugging Face tokenizer folder.

Prints one JSON object (the CLI's output); logs progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from model.loader import LoadedModel, load_model
from model.tokenizer import Tokenizer
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore, NullObserver

logger = logging.getLogger(__name__)
NEVER = 10**9
PROMPT_LEN = 48


@dataclass
class StepRecorder(NullObserver):
    """Collects (phase, step seconds, attention seconds) of every engine step."""

    steps: list[tuple[str, float, float | None]] = field(default_factory=list)

    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None
                ) -> None:
        self.steps.append((phase, step_s, attention_s))


def run_batch(engine: EngineCore, every: int, batch: int, tokens: int) -> list[tuple]:
    recorder = StepRecorder()
    engine.observer = recorder
    engine.config.attention_timing_every = every
    engine.step_count = 0  # so that "every 1" times each step from the first
    rng = random.Random(0)  # the same prompts in every run
    vocab = engine.loaded.config.vocab_size
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([rng.randrange(100, vocab) for _ in range(PROMPT_LEN - i)], params)
    while engine.has_unfinished():
        engine.step()
    return recorder.steps


def measure(config: EngineConfig, reps: int, batch: int, tokens: int, target: float,
            tokenizer_folder: str | None = None) -> dict[str, object]:
    loaded = None
    if tokenizer_folder is not None:
        bare = load_model(config.model, config.resolved_dtype(), config.resolved_device(),
                          config.seed, with_tokenizer=False)
        loaded = LoadedModel(bare.model, bare.config, Tokenizer.from_pretrained(tokenizer_folder),
                             bare.source)
    engine = EngineCore(config, loaded=loaded)
    run_batch(engine, NEVER, batch, 4)  # warm-up: allocator, kernels, caches
    pairs: list[dict[str, list[tuple]]] = []
    for rep in range(reps):
        order = ("every_step", "never") if rep % 2 == 0 else ("never", "every_step")
        pair = {mode: run_batch(engine, 1 if mode == "every_step" else NEVER, batch, tokens)
                for mode in order}
        pairs.append(pair)
        logger.info("rep %d/%d done", rep + 1, reps)
    phases: dict[str, dict[str, float]] = {}
    for phase in sorted({p for pair in pairs for steps in pair.values() for p, _, _ in steps}):
        stats = _phase_stats(pairs, phase)
        if stats is not None:
            phases[phase] = stats
    worst = max((max(0.0, p["overhead_fraction_every_step"]) for p in phases.values()),
                default=0.0)
    return {
        "device": str(engine.device), "device_name": device_name(engine.device),
        "torch_threads": torch.get_num_threads(), "model": engine.loaded.source,
        "dtype": str(engine.dtype), "backend": engine.backend.name,
        "layout": engine.layout.name, "page_size": engine.layout.page_size,
        "reps": reps, "batch": batch, "tokens": tokens, "phases": phases,
        "target_fraction": target,
        "recommended_every": max(1, math.ceil(worst / target)),
        "wrapper_cost_us_per_call": wrapper_cost_us(),
        "wrapped_calls_per_step": engine.loaded.config.num_layers,
    }


def _phase_stats(pairs: list[dict[str, list[tuple]]], phase: str) -> dict[str, float] | None:
    """Overhead of timing one step of `phase`: per pair of runs, the difference of the median
    step times (timed - untimed); the median over pairs is the estimate and their spread
    (half the range between the 25th and 75th percentile) shows the noise."""
    diffs, bases, timed_all, shares = [], [], [], []
    for pair in pairs:
        timed = [s for p, s, _ in pair["every_step"] if p == phase]
        plain = [s for p, s, _ in pair["never"] if p == phase]
        if not timed or not plain:
            continue
        diffs.append(statistics.median(timed) - statistics.median(plain))
        bases.append(statistics.median(plain))
        timed_all.extend(timed)
        shares.extend(a / s for p, s, a in pair["every_step"] if p == phase and a is not None)
    if not diffs:
        return None
    base = statistics.median(bases)
    delta = statistics.median(diffs)
    spread = 0.0
    if len(diffs) >= 4:
        q = statistics.quantiles(diffs, n=4)
        spread = (q[2] - q[0]) / 2
    return {
        "pairs": len(diffs), "steps_timed": len(timed_all),
        "median_step_ms_untimed": base * 1e3,
        "overhead_per_timed_step_ms": delta * 1e3,
        "overhead_noise_ms": spread * 1e3,
        "overhead_fraction_every_step": delta / base,
        "median_attention_share": statistics.median(shares) if shares else math.nan,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def wrapper_cost_us(calls: int = 200_000) -> float:
    """Cost of the CPU timer around one call (two perf_counter reads and an addition),
    net of the bare call: a floor under the overhead that noise cannot hide."""
    def fn() -> None:
        return None

    total = 0.0
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        s = time.perf_counter()
        fn()
        total += time.perf_counter() - s
    wrapped = time.perf_counter() - t0
    return max(0.0, wrapped - bare) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="as `serve --model` (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer-folder", default=None,
                   help="a saved Hugging Face tokenizer, for models loaded without one")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--kv-layout", default="nhd")
    p.add_argument("--reps", type=int, default=6, help="alternating pairs of runs")
    p.add_argument("--batch", type=int, default=4, help="requests per run")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--target", type=float, default=0.01, help="largest acceptable overhead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          attention_backend=args.attention_backend, kv_layout=args.kv_layout,
                          kv_cache_tokens=8192)
    result = measure(config, args.reps, args.batch, args.tokens, args.target,
                     args.tokenizer_folder)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
