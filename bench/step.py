"""`attnserve bench step`: where a decode step's time goes, against its bandwidth floor.

    attnserve bench step --model llama3-8b --tokenizer DIR --batches 1,16,64 \\
        --context-lens 512,4096 --json-out bench/results/DEVICE-step-DATE.json

For every batch size x context length, `batch` requests with prompts of `context` random
tokens are prefilled, then `--steps` decode steps of the whole batch run through the engine
(after `--warmup` more), once per schedule in `--schedules` (overlap: the host prepares step
N+1 while the device runs step N; sequential: --no-overlap-schedule), on the same engine.
The row:

- step: wall time per engine step, steady state (the engine's own loop, outputs included);
- forward: device time of the forward pass alone, embedding to final norm (the CUDA graph
  replayed on the step's staged inputs between CUDA events; an eager step's forward with
  its launch gaps when graphs are off);
- lm_head and sample: device time of the logits of the sampled rows, and of sampling them;
- host: step minus forward, lm_head and sample: the time the device waits for the host;
- floor: the bytes a decode step must read, weights (the embedding table excepted, of which
  a step reads only its rows) plus every sequence's K/V, over the copy bandwidth measured in
  the same run (a device-to-device copy; on a CPU, a memcpy); step/floor and forward/floor.
  With `--tensor-parallel-size N` the bytes are one rank's (its shard of the weights, its
  KV heads) and the floor adds the step's all-reduces: 2 per layer and 1 for the embedding,
  each of [batch, hidden], timed in the same run (`all_reduce_ms`, one of them; `comm_ms`,
  the step's). Every timed part runs on every rank, as the engine runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from model.parallel.runner import LeaderRunner
from model.runner import ModelRunner, PendingStep, StepInput
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore
from server.engine.args import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)

SCHEDULES = ("overlap", "sequential")


@dataclass
class StepRow:
    schedule: str
    batch: int
    context: int  # prompt tokens per sequence; the K/V read grows by one a step beyond it
    step_ms: float
    forward_ms: float
    forward_kind: str  # "graph" or "eager"
    lm_head_ms: float
    sample_ms: float
    host_ms: float
    floor_ms: float
    weight_bytes: int  # read per step: weights (embedding table excepted), one rank's
    kv_bytes: int  # read by the last timed step: every sequence's K/V, one rank's heads
    step_over_floor: float
    forward_over_floor: float
    tp_size: int = 1
    all_reduce_ms: float = 0.0  # one all-reduce of [batch, hidden] (0 unsplit)
    comm_ms: float = 0.0  # the step's all-reduces: (2 x layers + 1) x all_reduce_ms


def median_ms(fn: Callable[[], object], device: torch.device, iters: int = 20) -> float:
    """Median time of `fn()`: CUDA events around each call on a GPU, the clock on a CPU."""
    for _ in range(min(3, iters)):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_gbps(device: torch.device) -> float:
    """Bytes read + written per second / 1e9 of a large copy on `device`."""
    if device.type == "cuda":
        from bench.attention.common import measure_copy_gbps

        return measure_copy_gbps(device)
    nbytes = 1 << 27
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), device, iters=10) * 1e-3) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes a decode step reads: all but the embedding table, unless the LM head
    reads it (tied embeddings)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "lm_head", None) is not None:
        table = model.embed_tokens.weight
        total -= table.numel() * table.element_size()
    return total


def kv_bytes(engine: EngineCore, step: StepInput) -> int:
    """K and V bytes a decode step reads: every layer, every sequence's whole context (of a
    tensor-parallel rank: its KV heads)."""
    mc = engine.model.config
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.dtype.itemsize
    return per_token * sum(p + q for p, q in zip(step.prefix_lens, step.q_lens, strict=True))


class LaunchRecorder:
    """Wraps the runner's `launch` to keep the steps an engine launches."""

    def __init__(self, engine: EngineCore) -> None:
        self.steps: list[StepInput] = []
        self._launch = engine.runner.launch
        engine.runner.launch = self  # type: ignore[method-assign]

    def __call__(self, step: StepInput) -> PendingStep:
        self.steps.append(step)
        return self._launch(step)


def prefill_steps(batch: int, context: int, config: EngineConfig) -> int:
    """At most how many steps prefilling `batch` prompts of `context` tokens takes."""
    budget = config.max_num_batched_tokens or batch * context
    return -(-batch * context // budget) + 2


def decode_wall_ms(engine: EngineCore, recorder: LaunchRecorder, batch: int, context: int,
                   steps: int, warmup: int, rng: random.Random,
                   sampling: SamplingParams) -> tuple[float, StepInput]:
    """Prefill `batch` prompts, then time `steps` engine steps that decode all of them."""
    vocab = engine.loaded.config.vocab_size
    lo, hi = min(1000, vocab // 4), min(30000, vocab)
    # the first requests start decoding while the last ones are still prefilled in chunks
    params = dataclasses.replace(sampling, ignore_eos=True, max_tokens=warmup + steps + 4
                                 + prefill_steps(batch, context, engine.config))
    started: set[str] = set()
    rids = [engine.add_request([rng.randrange(lo, hi) for _ in range(context)], params,
                               sink=lambda out: started.add(out.request_id))
            for _ in range(batch)]
    while len(started) < batch:  # prefill until every request has its first token
        engine.step()
    for _ in range(warmup):
        engine.step()
    recorder.steps.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    shapes = {(s.num_decodes, len(s.q_lens)) for s in recorder.steps}
    if shapes != {(batch, batch)}:
        raise RuntimeError(f"timed steps were not all decodes of {batch}: {shapes}")
    last = recorder.steps[-1]
    for rid in rids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    engine.reset_prefix_cache()
    return wall_ms, last


def on_every_rank(runner: ModelRunner, fn: Callable[..., object], *args: object) -> object:
    """`fn(runner, *args)`, on every tensor-parallel rank when the model is split (its
    collectives need them all); rank 0's result."""
    if isinstance(runner, LeaderRunner):
        return runner.call_on_every_rank(fn, *args)
    return fn(runner, *args)


def step_parts_ms(engine: EngineCore, step: StepInput,
                  iters: int) -> tuple[float, str, float, float]:
    """Device time of the forward pass, the LM head and sampling of one decode step."""
    return on_every_rank(engine.runner, _step_parts_ms, step, iters)  # type: ignore[return-value]


def _step_parts_ms(runner: ModelRunner, step: StepInput,
                   iters: int) -> tuple[float, str, float, float]:
    device = runner.device
    with torch.inference_mode():
        hidden, graph = runner.forward_only(step)
        if graph:
            assert runner.graphs is not None
            forward_ms = median_ms(runner.graphs.replay_last, device, iters)
        else:
            forward_ms = median_ms(lambda: runner.forward_only(step), device, iters)
        lm_head_ms = median_ms(lambda: runner.model.compute_logits(hidden), device, iters)
        logits = runner.model.compute_logits(hidden)
        sample_ms = median_ms(lambda: runner.sampler(logits, step.sampling, step.generators),
                              device, iters)
    return forward_ms, "graph" if graph else "eager", lm_head_ms, sample_ms


ALL_REDUCES_TIMED = 10  # back to back between two events: launch gaps amortised


def all_reduce_ms(engine: EngineCore, rows: int, iters: int) -> float:
    """Device time of one all-reduce of [rows, hidden] in the model's dtype; 0 unsplit."""
    if not isinstance(engine.runner, LeaderRunner):
        return 0.0
    return on_every_rank(engine.runner, _all_reduce_ms, rows,  # type: ignore[return-value]
                         engine.model.config.hidden_size, engine.dtype, iters)


def _all_reduce_ms(runner: LeaderRunner, rows: int, hidden: int, dtype: torch.dtype,
                   iters: int) -> float:
    x = torch.randn(rows, hidden, device=runner.device).to(dtype)

    def reduces() -> None:
        for _ in range(ALL_REDUCES_TIMED):
            runner.tp.all_reduce(x)

    return median_ms(reduces, runner.device, iters) / ALL_REDUCES_TIMED


def measure(engine: EngineCore, batch: int, context: int, schedules: list[str], steps: int,
            warmup: int, gbps: float, seed: int = 0, iters: int = 20,
            sampling: SamplingParams | None = None) -> list[StepRow]:
    sampling = sampling or SamplingParams(temperature=0.0)
    recorder = LaunchRecorder(engine)
    rows = []
    weights = weight_bytes(engine.model)
    for schedule in schedules:
        engine.config.overlap_schedule = schedule == "overlap"  # read at every step
        wall_ms, last = decode_wall_ms(engine, recorder, batch, context, steps, warmup,
                                       random.Random(seed), sampling)
        forward_ms, kind, lm_head_ms, sample_ms = step_parts_ms(engine, last, iters)
        kv = kv_bytes(engine, last)
        reduce_ms = all_reduce_ms(engine, batch, iters)
        comm_ms = (2 * engine.model.config.num_layers + 1) * reduce_ms
        floor_ms = 1e3 * (weights + kv) / (gbps * 1e9) + comm_ms
        rows.append(StepRow(
            schedule=schedule, batch=batch, context=context, step_ms=round(wall_ms, 4),
            forward_ms=round(forward_ms, 4), forward_kind=kind, lm_head_ms=round(lm_head_ms, 4),
            sample_ms=round(sample_ms, 4),
            host_ms=round(wall_ms - forward_ms - lm_head_ms - sample_ms, 4),
            floor_ms=round(floor_ms, 4), weight_bytes=weights, kv_bytes=kv,
            step_over_floor=round(wall_ms / floor_ms, 3),
            forward_over_floor=round(forward_ms / floor_ms, 3),
            tp_size=engine.config.tensor_parallel_size, all_reduce_ms=round(reduce_ms, 4),
            comm_ms=round(comm_ms, 4),
        ))
        logger.info("%s", rows[-1])
    engine.runner.launch = recorder._launch  # type: ignore[method-assign]
    return rows


def format_table(rows: list[StepRow]) -> str:
    head = ("| schedule | batch | context | step ms | forward ms | lm head ms | sample ms | "
            "host ms | comm ms | floor ms | step/floor | forward/floor |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r.schedule} | {r.batch} | {r.context} | {r.step_ms:.3f} | "
                     f"{r.forward_ms:.3f} ({r.forward_kind}) | {r.lm_head_ms:.3f} | "
                     f"{r.sample_ms:.3f} | {r.host_ms:.3f} | {r.comm_ms:.3f} | "
                     f"{r.floor_ms:.3f} | {r.step_over_floor:.2f} | "
                     f"{r.forward_over_floor:.2f} |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers, comma-separated: {text!r}")
    return values


def _schedules(text: str) -> list[str]:
    names = [v for v in text.split(",") if v]
    bad = [n for n in names if n not in SCHEDULES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"schedules are {', '.join(SCHEDULES)}; got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnserve bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=_int_list, default=[1, 16, 64],
                   help="decode batch sizes, comma-separated")
    p.add_argument("--context-lens", type=_int_list, default=[512],
                   help="prompt tokens per sequence, comma-separated")
    p.add_argument("--cases", default=None,
                   help="explicit BATCHxCONTEXT pairs instead of the product, e.g. "
                        "1x512,16x512,64x512,64x4096")
    p.add_argument("--schedules", type=_schedules, default=list(SCHEDULES),
                   help="overlap, sequential or both (same engine, alternating)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per case")
    p.add_argument("--warmup", type=int, default=8, help="decode steps before timing")
    p.add_argument("--iters", type=int, default=20,
                   help="timed calls of the forward, the LM head and sampling (medians)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling of every request (default greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json-out", default=None, help="write the record here")
    add_engine_args(p)
    return p


def cases_of(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.cases:
        pairs = [c.lower().split("x") for c in args.cases.split(",") if c]
        return [(int(b), int(c)) for b, c in pairs]
    return [(b, c) for b in args.batches for c in args.context_lens]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cases = cases_of(args)
    config = engine_config_from_args(args)
    most = max(b for b, _ in cases)
    longest = max(c + args.warmup + args.steps + 8 + prefill_steps(b, c, config)
                  for b, c in cases)
    config.max_num_seqs = max(config.max_num_seqs, most)
    if config.kv_cache_tokens is None:  # room for the largest case, not the whole card
        config.kv_cache_tokens = max(b * (c + args.warmup + args.steps + 8
                                          + prefill_steps(b, c, config)) for b, c in cases) \
            + 4 * config.page_size * most
    config.max_model_len = max(config.max_model_len or 0, longest) or None
    config.log_stats = False
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    sampling.validate()
    engine = EngineCore(config)
    try:
        gbps = copy_gbps(engine.device)
        rows = []
        for batch, context in cases:
            rows += measure(engine, batch, context, args.schedules, args.steps, args.warmup,
                            gbps, args.bench_seed, args.iters, sampling)
    finally:
        engine.shutdown()  # tensor-parallel ranks, if any
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write), {engine.model_name}, "
          f"{engine.backend.name} {engine.layout.name}/{engine.layout.page_size}, "
          f"{engine.dtype}, {engine.device}")
    print(format_table(rows))
    if args.json_out:
        device = engine.device
        record = {
            "bench": "step", "date": datetime.date.today().isoformat(),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "torch": torch.__version__, "copy_gbps": round(gbps, 1),
            "config": engine.effective_config(), "steps": args.steps, "warmup": args.warmup,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p,
                         "top_k": args.top_k},
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0
