"""What does timing attention on every step cost, and how close is the estimate?

    python -m bench.metrics_timing_overhead [--device cuda] [--model llama3-8b]
        [--tokenizer-folder DIR] [--batches 1,16,64] [--prompt-len 512] [--reps 6]
        [--json-out FILE]

One engine (one model load) runs the same greedy workloads again and again:
- `decode-B`: B requests of `--prompt-len` tokens, `--tokens` generated each (decode steps
  replay CUDA graphs on a GPU);
- `mixed-B`: B/2 requests decoding while B/2 more arrive, their prompts chunked under a
  small token budget, so prefill, decode and mixed steps all occur.

Overhead: runs alternate between the device's timing mode (`one` on a GPU, `all` on the
CPU; model/attention_timing.py) and `off`, so that drift hits both alike; per pair, the
difference of the median step times by phase; the median over pairs, as a fraction of
the untimed median, is the overhead.

Interleaved overhead: one run in which the mode flips on every step, so that each pair of
neighbouring steps of a phase (one timed, one not, a token apart) sees the same machine;
runs start with either mode, so the order cancels. On a noisy machine (the 2-core CPU) this
resolves far less than whole-run pairs can.

Agreement: the same workloads run with every layer timed eagerly (`all`), the reference.
Two figures per phase: on the very same steps, the middle layer's time x the layer count
against the sum over layers; and, matched by step index (the workloads are deterministic),
the mean attention per step in the timed runs against the eager every-layer runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.attention_timing import LayerTimer, TimingMode, default_timing_mode
from model.loader import LoadedModel, load_model
from model.tokenizer import Tokenizer
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore, NullObserver

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    phase: str
    step_s: float
    attention_s: float | None
    layer_s: list[float] = field(default_factory=list)  # per layer, in `all` mode on a GPU


@dataclass
class StepRecorder(NullObserver):
    """Collects every engine step; in `all` mode also each layer's attention time. With
    `flip` (two modes), the runner's timing mode alternates between them after every step."""

    engine: EngineCore | None = None
    steps: list[StepRecord] = field(default_factory=list)
    flip: tuple[TimingMode, TimingMode] | None = None

    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None
                ) -> None:
        layers: list[float] = []
        runner = self.engine.runner if self.engine is not None else None
        if runner is not None and runner.attention_timing == "all" and runner.last_timer \
                and runner.last_timer.on_gpu:
            layers = runner.last_timer.layer_times_s()
        self.steps.append(StepRecord(phase, step_s, attention_s, layers))
        if self.flip is not None and runner is not None:
            a, b = self.flip
            _switch_mode(runner, b if runner.attention_timing == a else a)


def _switch_mode(runner, mode: TimingMode) -> None:
    """Between steps, without capturing: both modes' graphs exist after `run_once` in each."""
    runner.attention_timing = mode
    if runner.graphs is not None and mode != "all":
        runner.graphs.timing = mode


Workload = Callable[[EngineCore], None]


def _prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def decode_workload(batch: int, prompt_len: int, tokens: int) -> Workload:
    def run(engine: EngineCore) -> None:
        rng = random.Random(0)
        vocab = engine.loaded.config.vocab_size
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(_prompt(rng, vocab, prompt_len - i % 7), params)
        while engine.has_unfinished():
            engine.step()
    return run


def mixed_workload(batch: int, prompt_len: int, tokens: int) -> Workload:
    def run(engine: EngineCore) -> None:
        rng = random.Random(1)
        vocab = engine.loaded.config.vocab_size
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        first = max(1, batch // 2)
        for _ in range(first):
            engine.add_request(_prompt(rng, vocab, prompt_len), params)
        for _ in range(4):
            engine.step()
        for _ in range(batch - first):  # arrive while the first half decodes
            engine.add_request(_prompt(rng, vocab, prompt_len), params)
        while engine.has_unfinished():
            engine.step()
    return run


def run_once(engine: EngineCore, workload: Workload, mode: TimingMode) -> list[StepRecord]:
    engine.runner.set_attention_timing(mode)
    recorder = StepRecorder(engine)
    engine.observer = recorder
    engine.reset_prefix_cache()  # every run computes its prompts
    workload(engine)
    return recorder.steps


def run_interleaved(engine: EngineCore, workload: Workload, first: TimingMode,
                    second: TimingMode) -> list[StepRecord]:
    """One run whose timing mode flips on every step, starting with `first`; each record's
    `attention_s` is None exactly on the untimed steps."""
    _switch_mode(engine.runner, first)
    recorder = StepRecorder(engine, flip=(first, second))
    engine.observer = recorder
    engine.reset_prefix_cache()
    workload(engine)
    return recorder.steps


def interleaved_overhead(runs: list[list[StepRecord]]) -> dict[str, dict]:
    """Per phase: over neighbouring steps of that phase of which one was timed, the median
    of (timed - untimed) / untimed, and the interquartile range of those fractions."""
    fractions: dict[str, list[float]] = {}
    for steps in runs:
        for a, b in zip(steps, steps[1:], strict=False):
            if a.phase != b.phase or (a.attention_s is None) == (b.attention_s is None):
                continue
            timed, plain = (a, b) if a.attention_s is not None else (b, a)
            fractions.setdefault(a.phase, []).append(timed.step_s / plain.step_s - 1)
    out: dict[str, dict] = {}
    for phase, f in sorted(fractions.items()):
        q = statistics.quantiles(f, n=4) if len(f) >= 2 else [f[0]] * 3
        out[phase] = {"pairs": len(f), "median_fraction": statistics.median(f),
                      "q1_fraction": q[0], "q3_fraction": q[2]}
    return out


def _median_by_phase(steps: list[StepRecord]) -> dict[str, float]:
    phases = sorted({s.phase for s in steps})
    return {p: statistics.median(s.step_s for s in steps if s.phase == p) for p in phases}


def overhead(pairs: list[tuple[list[StepRecord], list[StepRecord]]]) -> dict[str, dict]:
    """Per phase: median over pairs of (timed median - untimed median), and as a fraction."""
    out: dict[str, dict] = {}
    medians = [(_median_by_phase(timed), _median_by_phase(plain)) for timed, plain in pairs]
    for phase in sorted({p for pair in medians for run in pair for p in run}):
        diffs, bases = [], []
        for timed_medians, plain_medians in medians:
            t, p = timed_medians.get(phase), plain_medians.get(phase)
            if t is not None and p is not None:
                diffs.append(t - p)
                bases.append(p)
        if not diffs:
            continue
        base, delta = statistics.median(bases), statistics.median(diffs)
        out[phase] = {"pairs": len(diffs), "median_step_ms_untimed": base * 1e3,
                      "overhead_ms": delta * 1e3, "overhead_fraction": delta / base,
                      "pair_fractions": [d / b for d, b in zip(diffs, bases, strict=True)]}
    return out


def agreement(timed: list[StepRecord], eager_all: list[StepRecord], num_layers: int
              ) -> dict[str, dict]:
    """Per phase: the one-layer estimate against every layer's sum on the same eager steps,
    and the timed runs' mean attention per step against the eager every-layer runs'."""
    out: dict[str, dict] = {}
    for phase in sorted({s.phase for s in eager_all}):
        row: dict[str, float | int] = {}
        same = [s for s in eager_all if s.phase == phase and len(s.layer_s) == num_layers]
        if same:
            errors = [num_layers * s.layer_s[num_layers // 2] / sum(s.layer_s) - 1 for s in same]
            row.update(same_step_steps=len(same),
                       same_step_mean_error=statistics.fmean(errors),
                       same_step_max_abs_error=max(abs(e) for e in errors))
        matched = [(a, b) for a, b in zip(timed, eager_all, strict=False)
                   if a.phase == b.phase == phase and a.attention_s and b.attention_s]
        if matched:
            mean_timed = statistics.fmean(a.attention_s for a, _ in matched)  # type: ignore[misc]
            mean_all = statistics.fmean(b.attention_s for _, b in matched)  # type: ignore[misc]
            ratios = [a.attention_s / b.attention_s for a, b in matched]  # type: ignore[operator]
            row.update(matched_steps=len(matched), mean_attention_ms_timed=mean_timed * 1e3,
                       mean_attention_ms_every_layer=mean_all * 1e3,
                       ratio_timed_to_every_layer=mean_timed / mean_all,
                       median_step_ratio=statistics.median(ratios))
        out[phase] = row
    return out


def slow_host(engine: EngineCore, delay_s: float) -> None:
    """Make every attention call spend `delay_s` on the host before it launches its kernels,
    inside the timed window: a host-bound machine on demand, for the launch-gap guard."""
    backend = engine.backend
    forward, forward_rope = backend.forward, backend.forward_rope

    def delayed(fn):
        def call(*args, **kwargs):
            time.sleep(delay_s)
            return fn(*args, **kwargs)
        return call

    backend.forward = delayed(forward)  # type: ignore[method-assign]
    backend.forward_rope = delayed(forward_rope)  # type: ignore[method-assign]


def measure(config: EngineConfig, batches: list[int], prompt_len: int, tokens: int, reps: int,
            tokenizer_folder: str | None = None, loaded: LoadedModel | None = None,
            host_delay_s: float = 0.0, launch_guard: bool = True) -> dict[str, object]:
    if loaded is None and tokenizer_folder is not None:
        bare = load_model(config.model, config.resolved_dtype(), config.resolved_device(),
                          config.seed, with_tokenizer=False)
        loaded = LoadedModel(bare.model, bare.config, Tokenizer.from_pretrained(tokenizer_folder),
                             bare.source)
    engine = EngineCore(config, loaded=loaded)
    if host_delay_s > 0:
        slow_host(engine, host_delay_s)
    if not launch_guard:
        engine.runner.launch_guard = None
    on_mode = default_timing_mode(engine.device)
    num_layers = engine.loaded.config.num_layers
    workloads = {}
    for b in batches:
        workloads[f"decode-{b}"] = decode_workload(b, prompt_len, tokens)
        workloads[f"mixed-{b}"] = mixed_workload(b, prompt_len, tokens)
    results: dict[str, dict] = {}
    for name, workload in workloads.items():
        run_once(engine, workload, "off")  # warm-up: allocator, kernels, graphs of both modes
        run_once(engine, workload, on_mode)
        pairs = []
        for rep in range(reps):
            order = (on_mode, "off") if rep % 2 == 0 else ("off", on_mode)
            runs = {mode: run_once(engine, workload, mode) for mode in order}
            pairs.append((runs[on_mode], runs["off"]))
        interleaved = [run_interleaved(engine, workload, *order)
                       for order in ((on_mode, "off"), ("off", on_mode))]
        guard = engine.runner.launch_guard
        holds_before = (guard.holds, guard.windows) if guard is not None else (0, 0)
        results[name] = {"overhead": overhead(pairs),
                         "interleaved_overhead": interleaved_overhead(interleaved),
                         "agreement": {}}
        if not config.overlap_schedule:  # the every-layer reference reads the runner's timer
            timed_for_agreement = run_once(engine, workload, on_mode)
            eager_all = run_once(engine, workload, "all")
            results[name]["agreement"] = agreement(timed_for_agreement, eager_all, num_layers)
        if guard is not None:
            results[name]["launch_gap_holds"] = {"held": guard.holds - holds_before[0],
                                                 "eager_windows": guard.windows - holds_before[1]}
        logger.info("%s: %s", name, json.dumps(results[name]["overhead"]))
    engine.runner.set_attention_timing(on_mode)
    return {
        "device": str(engine.device), "device_name": device_name(engine.device),
        "torch": torch.__version__, "model": engine.loaded.source, "dtype": str(engine.dtype),
        "backend": engine.backend.name, "layout": engine.layout.name,
        "page_size": engine.layout.page_size, "cuda_graphs": engine.runner.graphs is not None,
        "num_layers": num_layers, "timing_mode": on_mode, "reps": reps,
        "overlap_schedule": config.overlap_schedule,
        "host_delay_us_per_attention_call": host_delay_s * 1e6, "launch_guard": launch_guard,
        "hook_cost_us_per_step": hook_cost_us(engine.device, on_mode, num_layers),
        "prompt_len": prompt_len, "tokens": tokens, "workloads": results,
    }


def hook_cost_us(device: torch.device, mode: TimingMode, num_layers: int,
                 steps: int = 2000) -> float:
    """Host cost of one step's timing hook alone (begin/end for every layer, then the read),
    net of the bare loop: a floor under the step-level overhead that noise cannot hide."""
    def run(timed: bool) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            timer = LayerTimer(device, None if mode == "all" else num_layers // 2, num_layers)
            for layer in range(num_layers):
                if timed:
                    timer.begin(layer)
                    timer.end(layer)
            if device.type == "cuda":  # a step's events are read after its tokens are
                torch.cuda.current_stream(device).synchronize()
            if timed:
                timer.elapsed_s()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return max(0.0, run(True) - run(False)) / steps * 1e6


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def table(result: dict) -> str:
    lines = [f"{'workload':<11} {'phase':<8} {'untimed ms':>10} {'overhead':>9} "
             f"{'interleaved':>11} {'same-step err':>13} {'timed/every-layer':>17} "
             f"{'median ratio':>12}"]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for name, r in result["workloads"].items():
        for phase, o in r["overhead"].items():
            a = r["agreement"].get(phase, {})
            inter = r.get("interleaved_overhead", {}).get(phase, {})
            lines.append(f"{name:<11} {phase:<8} {o['median_step_ms_untimed']:>10.3f} "
                         f"{o['overhead_fraction']:>+9.2%} "
                         f"{fmt(inter.get('median_fraction'), '+.2%'):>11} "
                         f"{fmt(a.get('same_step_max_abs_error'), '.1%'):>13} "
                         f"{fmt(a.get('ratio_timed_to_every_layer'), '.3f'):>17} "
                         f"{fmt(a.get('median_step_ratio'), '.3f'):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="as `serve --model` (default: embedded SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokenizer-folder", default=None,
                   help="a saved Hugging Face tokenizer, for models loaded without one")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--kv-layout", default="nhd")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="token budget per step (chunks the mixed workload's prompts)")
    p.add_argument("--reps", type=int, default=6, help="alternating pairs of runs")
    p.add_argument("--host-delay-us", type=float, default=0.0,
                   help="sleep this long on the host in every attention call (simulates a "
                        "host-bound machine, to check the launch-gap guard)")
    p.add_argument("--no-launch-guard", action="store_true",
                   help="time eager one-layer windows without the launch-gap guard")
    p.add_argument("--overlap-schedule", action="store_true",
                   help="run the engine's overlap schedule (the server default): overhead "
                        "only, since the every-layer reference needs the sequential one")
    p.add_argument("--json-out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          attention_backend=args.attention_backend, kv_layout=args.kv_layout,
                          page_size=args.page_size, max_num_seqs=max(batches),
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.prompt_len + args.tokens + 8,
                          # the recorder reads the runner's last timer when a step's results
                          # arrive: that is the same step only without overlap
                          overlap_schedule=args.overlap_schedule)
    result = measure(config, batches, args.prompt_len, args.tokens, args.reps,
                     args.tokenizer_folder, host_delay_s=args.host_delay_us * 1e-6,
                     launch_guard=not args.no_launch_guard)
    text = json.dumps(result, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    print(text)
    print(table(result))


if __name__ == "__main__":
    main()
