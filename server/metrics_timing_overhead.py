"""How much does timing attention cost? Step time with attention timed on every step vs never.

    python -m server.metrics_timing_overhead [--device cpu] [--reps 6] [--batch 4] [--tokens 32]

Runs the offline engine (one model load) on the same greedy batch, alternating between
`attention_timing_every=1` and "never" so that drift (thermal, other processes) hits both
modes alike. Every engine step's wall time comes from the observer hook. The overhead of
one timed step is the difference of the median step times, per phase; with timing on
every Nth step the average overhead is that difference / N. The recommended N is the
smallest one that keeps it under the target fraction (1%) of the median step time.

Prints one JSON object (the CLI's output); logs progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field

from scheduler.request import SamplingParams
from server.config import EngineConfig
from server.engine import EngineCore
from server.outputs import NullObserver

logger = logging.getLogger(__name__)
NEVER = 10**9
PROMPT = ("Measure the cost of timing the attention kernel inside one engine step, "
          "for a small model on this machine. ")


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
    prompt_ids = engine.tokenizer.encode(PROMPT * 2)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(prompt_ids[: len(prompt_ids) - i], params)
    while engine.has_unfinished():
        engine.step()
    return recorder.steps


def measure(config: EngineConfig, reps: int, batch: int, tokens: int, target: float
            ) -> dict[str, object]:
    engine = EngineCore(config)
    run_batch(engine, NEVER, batch, 4)  # warm-up: allocator, kernels, caches
    by_mode: dict[str, list[tuple]] = {"every_step": [], "never": []}
    for rep in range(reps):
        order = ("every_step", "never") if rep % 2 == 0 else ("never", "every_step")
        for mode in order:
            every = 1 if mode == "every_step" else NEVER
            by_mode[mode].extend(run_batch(engine, every, batch, tokens))
        logger.info("rep %d/%d done", rep + 1, reps)
    phases: dict[str, dict[str, float]] = {}
    for phase in sorted({p for steps in by_mode.values() for p, _, _ in steps}):
        timed = [s for p, s, _ in by_mode["every_step"] if p == phase]
        plain = [s for p, s, _ in by_mode["never"] if p == phase]
        attn = [a for p, _, a in by_mode["every_step"] if p == phase and a is not None]
        if not timed or not plain:
            continue
        base = statistics.median(plain)
        delta = statistics.median(timed) - base
        phases[phase] = {
            "steps_timed": len(timed), "steps_untimed": len(plain),
            "median_step_ms_untimed": base * 1e3,
            "median_step_ms_timed": statistics.median(timed) * 1e3,
            "overhead_per_timed_step_ms": delta * 1e3,
            "overhead_fraction_every_step": delta / base,
            "median_attention_share": statistics.median(attn) / statistics.median(timed)
            if attn else math.nan,
        }
    worst = max((max(0.0, p["overhead_fraction_every_step"]) for p in phases.values()),
                default=0.0)
    return {
        "device": str(engine.device), "backend": engine.backend.name,
        "layout": engine.layout.name, "page_size": engine.layout.page_size,
        "reps": reps, "batch": batch, "tokens": tokens, "phases": phases,
        "target_fraction": target,
        "recommended_every": max(1, math.ceil(worst / target)),
        "wrapper_cost_us_per_call": wrapper_cost_us(),
        "wrapped_calls_per_step": engine.loaded.config.num_layers,
    }


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
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--kv-layout", default="nhd")
    p.add_argument("--reps", type=int, default=6, help="alternating pairs of runs")
    p.add_argument("--batch", type=int, default=4, help="requests per run")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--target", type=float, default=0.01, help="largest acceptable overhead")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = EngineConfig(device=args.device, attention_backend=args.attention_backend,
                          kv_layout=args.kv_layout, kv_cache_tokens=8192)
    result = measure(config, args.reps, args.batch, args.tokens, args.target)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
