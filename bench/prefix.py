"""`attnserve bench prefix`: one shared-prefix workload with the prefix cache off, then on,
each reported with its TTFT distribution, wall time and where the time went (prefill, mixed
and decode steps, their attention share, and what ran outside the model steps), next to the
machine's load average (a shared CPU machine's load moves these numbers by several times)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scheduler.request import SamplingParams
from server.engine import LLM, EngineCore
from server.engine.args import add_engine_args, engine_config_from_args
from server.engine.outputs import NullObserver

PHASES = ("prefill", "mixed", "decode")


class StepRecorder(NullObserver):
    """Every engine step's phase, tokens, time and attention time."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int, float, float | None]] = []

    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None) -> None:
        self.steps.append((phase, num_tokens, step_s, attention_s))


@dataclass
class PhaseTime:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    attention_s: float = 0.0


@dataclass
class PrefixRun:
    prefill_tokens_computed: int
    mean_ttft_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    wall_s: float
    throughput_tok_s: float
    # step time (model forward, sampling, scheduler update) by phase, and the rest of the
    # wall time: scheduling, detokenization, the generate loop
    phases: dict[str, PhaseTime] = field(default_factory=dict)
    outside_steps_s: float = 0.0
    attention_share: float = 0.0  # attention time / step time, all phases
    load_avg_1m: tuple[float, float] = (0.0, 0.0)  # before, after


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def shared_prefix_prompts(rng: random.Random, groups: int, per_group: int, system_len: int,
                          question_len: int) -> list[list[int]]:
    prompts = []
    for _ in range(groups):
        system = [rng.randrange(1000, 30000) for _ in range(system_len)]
        for _ in range(per_group):
            prompts.append(system + [rng.randrange(1000, 30000) for _ in range(question_len)])
    return prompts


def run_prefix_workload(llm: LLM, recorder: StepRecorder, prompts: list[list[int]],
                        output_len: int) -> PrefixRun:
    before = llm.engine.prefill_tokens_computed
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    recorder.steps.clear()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    phases = {p: PhaseTime() for p in PHASES}
    for phase, tokens, step_s, attention_s in recorder.steps:
        t = phases[phase]
        t.steps += 1
        t.tokens += tokens
        t.seconds += step_s
        t.attention_s += attention_s or 0.0
    step_total = sum(t.seconds for t in phases.values())
    return PrefixRun(
        prefill_tokens_computed=llm.engine.prefill_tokens_computed - before,
        mean_ttft_s=statistics.fmean(ttfts),
        p50_ttft_s=percentile(ttfts, 50),
        p99_ttft_s=percentile(ttfts, 99),
        wall_s=wall,
        throughput_tok_s=len(prompts) * output_len / wall,
        phases=phases,
        outside_steps_s=wall - step_total,
        attention_share=sum(t.attention_s for t in phases.values()) / max(step_total, 1e-9),
        load_avg_1m=(load_before, os.getloadavg()[0]),
    )


def _print_run(label: str, run: PrefixRun) -> None:
    print(f"{label:9s} prefill tokens {run.prefill_tokens_computed:7d}  TTFT mean "
          f"{run.mean_ttft_s:7.2f} s  p50 {run.p50_ttft_s:7.2f} s  p99 {run.p99_ttft_s:7.2f} s  "
          f"wall {run.wall_s:7.2f} s  {run.throughput_tok_s:6.2f} tok/s  "
          f"load {run.load_avg_1m[0]:.1f}->{run.load_avg_1m[1]:.1f}")
    for name, t in run.phases.items():
        if t.steps:
            print(f"          {name:8s} {t.steps:4d} steps {t.tokens:7d} tokens {t.seconds:8.2f} s "
                  f"(attention {t.attention_s:7.2f} s)")
    print(f"          outside steps {run.outside_steps_s:.2f} s; attention share of step time "
          f"{run.attention_share:.0%}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="attnserve bench prefix",
                                description="shared-prefix workload with the prefix cache on and off")
    p.add_argument("--num-groups", type=int, default=4, help="groups with their own system prompt")
    p.add_argument("--prompts-per-group", type=int, default=8, help="prompts sharing each one")
    p.add_argument("--system-prompt-len", type=int, default=1024, help="shared prefix tokens")
    p.add_argument("--question-len", type=int, default=64, help="unique tokens per prompt")
    p.add_argument("--output-len", type=int, default=16, help="tokens generated per prompt")
    p.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with cache_off and cache_on")
    p.add_argument("--json-out", default=None, help="also write that JSON object to this file")
    add_engine_args(p)
    args = p.parse_args(argv)
    prompts = shared_prefix_prompts(random.Random(args.bench_seed), args.num_groups,
                                    args.prompts_per_group, args.system_prompt_len, args.question_len)
    runs: dict[str, PrefixRun] = {}
    loaded = None
    backend = ""
    for label, enabled in (("cache_off", False), ("cache_on", True)):
        config = engine_config_from_args(args)
        config.enable_prefix_cache = enabled
        config.log_stats = False
        recorder = StepRecorder()
        llm = LLM.__new__(LLM)
        llm.engine = EngineCore(config, observer=recorder, loaded=loaded)
        llm.tokenizer = llm.engine.tokenizer
        loaded = llm.engine.loaded
        backend = llm.engine.backend.name
        # warm-up on tokens no prompt uses, so it adds no prefix hits
        llm.generate([[500 + i for i in range(32)]], SamplingParams(max_tokens=2))
        runs[label] = run_prefix_workload(llm, recorder, prompts, args.output_len)
        if not args.json:
            _print_run(label, runs[label])
        # the next engine sizes its KV pool from the free GPU memory: release this one's
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    off, on = runs["cache_off"], runs["cache_on"]
    ratios = {"mean_ttft": off.mean_ttft_s / on.mean_ttft_s,
              "p50_ttft": off.p50_ttft_s / on.p50_ttft_s, "wall": off.wall_s / on.wall_s}
    result = {
        "cache_off": asdict(off), "cache_on": asdict(on), "cache_on_speedup": ratios,
        "attention_backend": backend, "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "workload": {
            "num_groups": args.num_groups, "prompts_per_group": args.prompts_per_group,
            "system_prompt_len": args.system_prompt_len, "question_len": args.question_len,
            "output_len": args.output_len},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("cache on vs off: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
