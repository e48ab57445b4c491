"""How far `bench throughput` can go on this CPU: the weight GEMMs of each engine's schedule.

    python -m bench.cpu_ceiling --num-prompts 32 --input-len 128 --output-len 64 \\
        --range-ratio 0.75 --json-out out.json

The workload is `bench throughput`'s (same seed, same prompts). In one invocation, alternating
for `--repeats` rounds:

- attnserve's real run (cold prefix cache), with its step schedule recorded: per step the
  prefill rows, the decode rows and the rows that get logits (`ScheduleStep`);
- the GEMM-only replay of that schedule: every layer's fused qkv, o, fused gate_up and down
  projections over the step's rows, and the LM head over its logit rows only, with the
  engine's own weights and nothing else (no attention, norms, rotary, sampling or host
  work). It is what any engine computing exactly those rows with torch's GEMMs pays at least;
- transformers' batched `generate` (`bench.offline.transformers_throughput`), real;
- the GEMM-only replay of transformers' padded schedule (`padded_schedule`): each batch's
  prompts padded to its longest, every step at the full batch until its longest output,
  logits for one row per sequence per step (generate's `logits_to_keep=1`), with the same
  fused weights.

The ceiling ratio is transformers' real time over attnserve's GEMM-only time: the most
attnserve could reach over transformers by removing everything but its weight GEMMs. Results
and the table: docs/cpu-path.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.offline import random_prompts, sample_lengths, transformers_throughput
from model.runner import PendingStep, StepInput
from scheduler.request import SamplingParams
from server.engine import LLM
from server.engine.args import add_engine_args, engine_config_from_args


@dataclass(frozen=True)
class ScheduleStep:
    prefill_rows: int  # prompt tokens computed in the step (chunks of prefills)
    decode_rows: int
    logit_rows: int  # rows whose logits are computed (sampled)

    @property
    def rows(self) -> int:
        return self.prefill_rows + self.decode_rows


def step_of(step: StepInput) -> ScheduleStep:
    decode_rows = sum(step.q_lens[: step.num_decodes])
    return ScheduleStep(sum(step.q_lens) - decode_rows, decode_rows, len(step.sample_seqs))


def padded_schedule(in_lens: list[int], out_lens: list[int],
                    batch_size: int) -> list[ScheduleStep]:
    """transformers' batched `generate` as `transformers_throughput` runs it: per batch one
    forward over the prompts left-padded to the longest, then one forward per further token
    of the longest output, every sequence in every forward, one logit row per sequence."""
    steps = []
    for s in range(0, len(in_lens), batch_size):
        ins, outs = in_lens[s : s + batch_size], out_lens[s : s + batch_size]
        b = len(ins)
        steps.append(ScheduleStep(b * max(ins), 0, b))
        steps += [ScheduleStep(0, b, b)] * (max(outs) - 1)
    return steps


PROJECTIONS = ("qkv", "o", "gate_up", "down")  # a layer's, in the order a step runs them


@dataclass
class ModelWeights:
    """The weight matrices ([out, in]) of a Llama-family CausalLM (model/llama.py) as the
    engine holds them: per layer by projection name, and the LM head's (the embedding table
    when tied)."""

    layers: list[dict[str, torch.Tensor]]
    head: torch.Tensor

    @staticmethod
    def of(model: torch.nn.Module) -> ModelWeights:
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not hasattr(attn, "qkv_proj") or not hasattr(mlp, "gate_up_proj"):
                raise ValueError("the GEMM replay knows the Llama family's layers (fused qkv "
                                 f"and gate_up projections), not {type(layer).__name__}")
            layers.append({"qkv": attn.qkv_proj.weight, "o": attn.o_proj.weight,
                           "gate_up": mlp.gate_up_proj.weight, "down": mlp.down_proj.weight})
        return ModelWeights(layers, model.logits_weight)

    def shapes(self, step: ScheduleStep) -> list[tuple[int, int, int]]:
        """(rows, in, out) of every GEMM of `step`, in the order the replay runs them."""
        shapes = [(step.rows, layer[n].shape[1], layer[n].shape[0])
                  for layer in self.layers for n in PROJECTIONS] if step.rows else []
        if step.logit_rows:
            shapes.append((step.logit_rows, self.head.shape[1], self.head.shape[0]))
        return shapes

    def flops(self, schedule: list[ScheduleStep]) -> int:
        return sum(2 * m * k * n for step in schedule for m, k, n in self.shapes(step))


class GemmReplay:
    """Runs only the weight GEMMs of a schedule: per step and layer x[rows] @ W^T for the four
    projections, then the LM head on the step's logit rows. Inputs are fixed random buffers
    (GEMM time does not depend on the values), outputs preallocated: nothing but `torch.mm`
    runs per matrix."""

    def __init__(self, weights: ModelWeights, max_rows: int, max_logit_rows: int) -> None:
        self.weights = weights
        head = weights.head
        g = torch.Generator(device=head.device).manual_seed(0)
        mats = dict(weights.layers[0]) | {"lm_head": head}
        self.inputs: dict[str, torch.Tensor] = {}  # [most rows, in] by projection
        self.outputs: dict[str, torch.Tensor] = {}
        for name, w in mats.items():
            rows = max_logit_rows if name == "lm_head" else max_rows
            self.inputs[name] = torch.randn(rows, w.shape[1], generator=g, dtype=w.dtype,
                                            device=w.device) * 0.1
            self.outputs[name] = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)

    def _mm(self, name: str, w: torch.Tensor, rows: int) -> None:
        torch.mm(self.inputs[name][:rows], w.t(), out=self.outputs[name][:rows])

    def step(self, step: ScheduleStep) -> None:
        if step.rows > self.inputs["qkv"].shape[0] \
                or step.logit_rows > self.inputs["lm_head"].shape[0]:
            raise ValueError(f"{step} exceeds the replay's buffers")
        if step.rows:
            for layer in self.weights.layers:
                for name in PROJECTIONS:
                    self._mm(name, layer[name], step.rows)
        if step.logit_rows:
            self._mm("lm_head", self.weights.head, step.logit_rows)

    @torch.inference_mode()
    def time(self, schedule: list[ScheduleStep]) -> list[float]:
        """Seconds of each step's GEMMs, in schedule order."""
        times = []
        for step in schedule:
            t0 = time.perf_counter()
            self.step(step)
            times.append(time.perf_counter() - t0)
        return times


class ScheduleRecorder:
    """Wraps the runner's `launch`: each step's schedule row and launch time (on a CPU the
    launch computes the whole step, sampling included)."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self._launch = self.runner.launch
        self.steps: list[ScheduleStep] = []
        self.seconds: list[float] = []
        self.runner.launch = self  # type: ignore[method-assign]

    def __call__(self, step: StepInput) -> PendingStep:
        t0 = time.perf_counter()
        pending = self._launch(step)
        self.seconds.append(time.perf_counter() - t0)
        self.steps.append(step_of(step))
        return pending

    def clear(self) -> None:
        self.steps, self.seconds = [], []

    def detach(self) -> None:
        self.runner.launch = self._launch  # type: ignore[method-assign]


@dataclass
class PhaseTimes:
    """Seconds by kind of step: with prompt rows (prefill or mixed), decode rows only."""

    prefill_or_mixed_s: float
    decode_only_s: float

    @staticmethod
    def of(schedule: list[ScheduleStep], seconds: list[float]) -> PhaseTimes:
        pre = sum(t for s, t in zip(schedule, seconds, strict=True) if s.prefill_rows)
        return PhaseTimes(pre, sum(seconds) - pre)


def summary(schedule: list[ScheduleStep]) -> dict[str, int]:
    return {"steps": len(schedule), "prefill_rows": sum(s.prefill_rows for s in schedule),
            "decode_rows": sum(s.decode_rows for s in schedule),
            "logit_rows": sum(s.logit_rows for s in schedule),
            "steps_with_prefill": sum(1 for s in schedule if s.prefill_rows),
            "mixed_steps": sum(1 for s in schedule if s.prefill_rows and s.decode_rows)}


@dataclass
class Round:
    """One repeat: the four measurements, back to back."""

    attnserve_real_s: float
    attnserve_steps_s: float  # sum of its step launches; the rest is outside the model
    attnserve_phases: PhaseTimes
    attnserve_gemm_s: float
    attnserve_gemm_phases: PhaseTimes
    transformers_real_s: float | None
    transformers_gemm_s: float
    load_avg_1m: float


def run_rounds(llm: LLM, hf: torch.nn.Module | None, prompts: list[list[int]],
               out_lens: list[int], batch_size: int, repeats: int,
               on_round: Callable[[list[Round], list[ScheduleStep]], None] | None = None,
               ) -> tuple[list[Round], list[ScheduleStep]]:
    """`repeats` rounds; `on_round` sees the rounds so far and the schedule after each (a
    loaded machine can take many minutes a round)."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    in_lens = [len(p) for p in prompts]
    padded = padded_schedule(in_lens, out_lens, batch_size)
    llm.generate(prompts[:2], params[:2])  # warm-up
    if hf is not None:
        transformers_throughput(hf, prompts[:2], [2, 2], 2)
    recorder = ScheduleRecorder(llm)
    rounds: list[Round] = []
    schedule: list[ScheduleStep] | None = None
    replay: GemmReplay | None = None
    try:
        for r in range(repeats):
            llm.engine.reset_prefix_cache()  # cold, as transformers' run is
            recorder.clear()
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            real_s = time.perf_counter() - t0
            if schedule is None:
                schedule = recorder.steps
                replay = GemmReplay(ModelWeights.of(llm.engine.model),
                                    max(s.rows for s in schedule + padded),
                                    max(s.logit_rows for s in schedule + padded))
            elif recorder.steps != schedule:
                raise RuntimeError("attnserve's schedule changed between repeats")
            assert replay is not None
            gemm = replay.time(schedule)
            theirs_s = None
            if hf is not None:
                theirs_s = sum(out_lens) / transformers_throughput(hf, prompts, out_lens,
                                                                  batch_size)
            theirs_gemm_s = sum(replay.time(padded))
            rounds.append(Round(
                attnserve_real_s=real_s, attnserve_steps_s=sum(recorder.seconds),
                attnserve_phases=PhaseTimes.of(schedule, recorder.seconds),
                attnserve_gemm_s=sum(gemm), attnserve_gemm_phases=PhaseTimes.of(schedule, gemm),
                transformers_real_s=theirs_s, transformers_gemm_s=theirs_gemm_s,
                load_avg_1m=os.getloadavg()[0]))
            print(f"round {r + 1}: attnserve {real_s:.2f} s (GEMMs {sum(gemm):.2f} s), "
                  f"transformers {theirs_s or float('nan'):.2f} s "
                  f"(GEMMs {theirs_gemm_s:.2f} s), load {rounds[-1].load_avg_1m:.1f}",
                  flush=True)
            if on_round is not None:
                on_round(rounds, schedule)
    finally:
        recorder.detach()
    assert schedule is not None
    return rounds, schedule


def ceiling(rounds: list[Round], target: float = 2.0) -> dict[str, float | None]:
    """Medians over the rounds, and what they allow."""
    def med(values: list[float]) -> float:
        return statistics.median(values)

    ours = med([r.attnserve_real_s for r in rounds])
    ours_gemm = med([r.attnserve_gemm_s for r in rounds])
    theirs_gemm = med([r.transformers_gemm_s for r in rounds])
    out: dict[str, float | None] = {
        "attnserve_real_s": ours, "attnserve_gemm_s": ours_gemm,
        "attnserve_overhead_s": ours - ours_gemm,
        "attnserve_outside_steps_s": med([r.attnserve_real_s - r.attnserve_steps_s
                                          for r in rounds]),
        "transformers_gemm_s": theirs_gemm,
        "gemm_ratio": theirs_gemm / ours_gemm,
        "transformers_real_s": None, "ratio": None, "ceiling_ratio": None,
        "overhead_to_remove_s": None, "overhead_to_remove_share": None,
    }
    theirs = [r.transformers_real_s for r in rounds if r.transformers_real_s is not None]
    if theirs:
        t = med(theirs)
        allowed = t / target  # attnserve's time at the target ratio
        out |= {"transformers_real_s": t, "ratio": t / ours, "ceiling_ratio": t / ours_gemm,
                "overhead_to_remove_s": max(0.0, ours - allowed),
                "overhead_to_remove_share": max(0.0, ours - allowed) / (ours - ours_gemm)
                if ours > ours_gemm else None}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.75,
                   help="lengths uniform in [L(1-R), L(1+R)], as `bench throughput`")
    p.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four measurements")
    p.add_argument("--target", type=float, default=2.0,
                   help="ratio over transformers to report the overhead budget for")
    p.add_argument("--skip-transformers", action="store_true",
                   help="no real transformers run (its padded schedule is still replayed)")
    p.add_argument("--json-out", default=None, help="write the record here")
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rng = random.Random(args.bench_seed)
    in_lens = sample_lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    out_lens = sample_lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    llm = LLM(engine_config_from_args(args))
    vocab = llm.engine.loaded.config.vocab_size  # SmolLM2's: bench throughput's prompts
    prompts = random_prompts(rng, in_lens, min(1000, vocab // 4), min(30000, vocab))
    hf = None
    if not args.skip_transformers:
        from model.hf_reference import load_hf_model

        hf = load_hf_model(args.model, str(llm.engine.dtype))
    load_before = os.getloadavg()
    padded = padded_schedule(in_lens, out_lens, args.max_num_seqs)
    weights = ModelWeights.of(llm.engine.model)

    def record_of(rounds: list[Round], schedule: list[ScheduleStep]) -> dict:
        return {
            "bench": "cpu_ceiling", "date": datetime.date.today().isoformat(),
            "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len,
                         "output_len": args.output_len, "range_ratio": args.range_ratio,
                         "bench_seed": args.bench_seed, "prompt_tokens": sum(in_lens),
                         "output_tokens": sum(out_lens)},
            "config": llm.engine.effective_config(), "target": args.target,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "result": ceiling(rounds, args.target), "rounds_done": len(rounds),
            "attnserve_schedule": summary(schedule) | {"gemm_flops": weights.flops(schedule)},
            "transformers_schedule": summary(padded) | {"gemm_flops": weights.flops(padded)},
            "rounds": [asdict(r) for r in rounds],
            # per step: [prefill rows, decode rows, logit rows]
            "attnserve_steps": [[s.prefill_rows, s.decode_rows, s.logit_rows] for s in schedule],
        }

    def write(rounds: list[Round], schedule: list[ScheduleStep]) -> None:
        if args.json_out:
            Path(args.json_out).write_text(
                json.dumps(record_of(rounds, schedule), indent=1, default=str) + "\n")

    rounds, _ = run_rounds(llm, hf, prompts, out_lens, args.max_num_seqs, args.repeats, write)
    print(format_result(ceiling(rounds, args.target), args.target))
    print(f"load average (1 min) {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


def format_result(r: dict[str, float | None], target: float) -> str:
    def s(key: str) -> str:
        v = r[key]
        return "-" if v is None else f"{v:.2f}"

    return "\n".join([
        "| | seconds |", "|---|---|",
        f"| attnserve, real | {s('attnserve_real_s')} |",
        f"| attnserve, GEMMs only | {s('attnserve_gemm_s')} |",
        f"| attnserve, overhead (real - GEMMs) | {s('attnserve_overhead_s')} |",
        f"| attnserve, outside model steps | {s('attnserve_outside_steps_s')} |",
        f"| transformers, real | {s('transformers_real_s')} |",
        f"| transformers' padded schedule, GEMMs only | {s('transformers_gemm_s')} |",
        f"| ratio (transformers real / attnserve real) | {s('ratio')}x |",
        f"| ceiling (transformers real / attnserve GEMMs) | {s('ceiling_ratio')}x |",
        f"| overhead to remove for {target:g}x | {s('overhead_to_remove_s')} |",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
