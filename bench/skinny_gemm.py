"""The skinny GEMM against torch's F.linear on every projection of a model (GPU).

    python -m bench.skinny_gemm --model llama3-8b --rows 1,16,64 \\
        --json-out bench/results/DEVICE-skinny-gemm-DATE.json

For each projection shape of the model (qkv, o, gate_up, down: one per layer; the LM head
once) and each row count M: F.linear's time, the Triton kernel's with its default launch
config (model/skinny_gemm.py `choose_config`) and the best of a small sweep (tile shapes
first, then K splits, warps and stages around the best tile), each as a fraction of the copy
bandwidth measured in the same run, bytes = weights + x + y. Then, per M, the sum over a
whole decode step (every layer's four products + the LM head) against the weight-bytes
floor (the weights over the copy bandwidth), for torch, the default and the best configs.

Timing: a CUDA graph of calls on distinct copies of the weight (enough copies that they
cannot stay in L2, as a step's 32 layers cannot), replayed between CUDA events; each call's
time is the replay's over the number of calls, launch gaps of a graph included, as in the
engine's captured decode steps. Every config's output is checked against F.linear's before
it is timed; a config that disagrees is reported and never chosen.

The sweep's best configs are printed as `TUNED` entries for model/skinny_gemm.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import triton

from bench.attention.common import measure_copy_gbps, time_cuda_us
from model.loader import peek_model_config
from model.skinny_gemm import (
    FMA_MAX_ROWS,
    SkinnyConfig,
    choose_config,
    launch_shape,
    num_sms,
    row_block,
    skinny_linear,
    split_for,
)

logger = logging.getLogger(__name__)

GRAPH_CALLS_US = 300.0  # a timed graph holds at least this much work
MAX_REL_ERR = 2e-2  # of a config's output against F.linear's, relative to its largest value


@dataclass(frozen=True)
class Projection:
    op: str
    n: int
    k: int
    per_step: int  # calls in one decode step


def projections(config: object) -> list[Projection]:
    """The Llama family's products of one decode step (fused qkv and gate_up, as built)."""
    c = config
    layers = c.num_layers  # type: ignore[attr-defined]
    h, q, kv = c.hidden_size, c.q_size, c.kv_size  # type: ignore[attr-defined]
    inter = c.intermediate_size  # type: ignore[attr-defined]
    return [Projection("qkv", q + 2 * kv, h, layers), Projection("o", h, q, layers),
            Projection("gate_up", 2 * inter, h, layers), Projection("down", h, inter, layers),
            Projection("lm_head", c.vocab_size, h, 1)]  # type: ignore[attr-defined]


@dataclass
class GemmRow:
    op: str
    rows: int
    n: int
    k: int
    per_step: int
    bytes: int  # weights + x + y, 2-byte elements
    torch_us: float
    default_us: float
    default_config: str
    best_us: float
    best_config: str
    torch_fraction: float  # of the copy bandwidth: bytes / time / copy GB/s
    default_fraction: float
    best_fraction: float
    wrong_configs: list[str]
    best: SkinnyConfig | None = None


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return 0  # the CPU interpreter (the tests): two copies


class WeightSet:
    """Copies of one [N, K] weight, enough that cycling through them misses L2."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device) -> None:
        nbytes = n * k * dtype.itemsize
        copies = max(2, triton.cdiv(3 * last_level_cache_bytes(device), nbytes))
        self.weights = [(torch.randn(n, k, device=device) * k**-0.5).to(dtype)
                        for _ in range(copies)]

    def time_us(self, fn: Callable[[torch.Tensor], object], single_us: float, iters: int) -> float:
        """Per-call device time of fn(weight) cycled through the copies inside one graph
        (on a CPU, the interpreter's wall time: for the tests)."""
        if self.weights[0].device.type != "cuda":
            t0 = time.perf_counter()
            for w in self.weights:
                fn(w)
            return 1e6 * (time.perf_counter() - t0) / len(self.weights)
        repeats = max(1, round(GRAPH_CALLS_US / max(single_us * len(self.weights), 1.0)))
        calls = [w for _ in range(repeats) for w in self.weights]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and settle the allocator outside the graph
            for w in self.weights:
                fn(w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in calls:
                fn(w)
        us = time_cuda_us(graph.replay, warmup=3, iters=iters) / len(calls)
        del graph
        return us


def sweep_tiles(m: int) -> list[tuple[int, int, bool]]:
    """(BLOCK_N, BLOCK_K, tl.dot) candidates for m rows: tl.dot tiles always, the
    elementwise path for a row block of at most 8 (its accumulator within 64 registers a
    thread of 4 warps)."""
    dot = [(16, 256, True), (32, 128, True), (32, 256, True), (64, 128, True), (64, 64, True),
           (128, 64, True)]
    if row_block(m, False) > 8:
        return dot
    fma = [(bn, bk, False) for bn, bk in ((8, 512), (16, 256), (16, 128), (32, 128), (32, 64),
                                          (16, 64), (8, 128))
           if row_block(m, False) * bn * bk <= 8192]
    return fma + dot


def neighbours(best: SkinnyConfig, k: int) -> list[SkinnyConfig]:
    """The best tile's config with one of splits, warps or stages changed."""
    out = []
    for split in (best.split_k // 2, best.split_k * 2, best.split_k * 4):
        c = dataclasses.replace(best, split_k=split)
        if split >= 1 and launch_shape(k, c)[1] == split and split != best.split_k:
            out.append(c)
    out += [dataclasses.replace(best, num_warps=w) for w in (4, 8) if w != best.num_warps]
    out += [dataclasses.replace(best, num_stages=s) for s in (2, 3, 4, 5)
            if s != best.num_stages]
    return out


class ShapeBench:
    """Times torch and kernel configs on one (projection, M)."""

    def __init__(self, proj: Projection, m: int, weights: WeightSet, iters: int,
                 gbps: float) -> None:
        self.proj, self.m, self.weights, self.iters = proj, m, weights, iters
        w0 = weights.weights[0]
        self.x = torch.randn(m, proj.k, device=w0.device).to(w0.dtype)
        self.expected = F.linear(self.x, w0).float()
        self.scale = self.expected.abs().max().item()
        # sizes the timed graphs
        self.floor_us = 1e6 * proj.n * proj.k * w0.element_size() / (gbps * 1e9)
        self.wrong: list[str] = []
        self.times: dict[SkinnyConfig, float] = {}

    def torch_us(self) -> float:
        return self.weights.time_us(lambda w: F.linear(self.x, w), self.floor_us, self.iters)

    def config_us(self, config: SkinnyConfig) -> float | None:
        """None when the config's output disagrees with F.linear's (or fails to build)."""
        if config in self.times:
            return self.times[config]
        try:
            y = skinny_linear(self.x, self.weights.weights[0], config=config).float()
        except Exception as exc:  # a config the compiler rejects (registers, shared memory)
            logger.warning("%s at %d rows: %s fails: %s", self.proj.op, self.m, config.label(),
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.wrong.append(f"{config.label()} (fails)")
            return None
        err = (y - self.expected).abs().max().item() / max(self.scale, 1e-30)
        if not err <= MAX_REL_ERR:
            self.wrong.append(f"{config.label()} (rel err {err:.2e})")
            return None
        us = self.weights.time_us(lambda w: skinny_linear(self.x, w, config=config),
                                  self.floor_us, self.iters)
        self.times[config] = us
        return us

    def sweep(self, sms: int) -> SkinnyConfig | None:
        n, k = self.proj.n, self.proj.k
        tiles = [SkinnyConfig(bn, bk, split_for(n, k, bn, bk, sms, 1.5 if dot else 4.0), dot,
                              4, 4 if dot else 3)
                 for bn, bk, dot in sweep_tiles(self.m)]
        for c in tiles:
            self.config_us(c)
        if not self.times:
            return None
        best = min(self.times, key=self.times.__getitem__)
        for c in neighbours(best, k):
            self.config_us(c)
        return min(self.times, key=self.times.__getitem__)


def measure(proj: Projection, rows: list[int], dtype: torch.dtype, device: torch.device,
            gbps: float, sweep: bool, iters: int) -> list[GemmRow]:
    weights = WeightSet(proj.n, proj.k, dtype, device)
    sms = num_sms(device)
    out = []
    for m in rows:
        bench = ShapeBench(proj, m, weights, iters, gbps)
        nbytes = (proj.n * proj.k + m * proj.k + m * proj.n) * dtype.itemsize
        torch_us = bench.torch_us()
        default = choose_config(m, proj.n, proj.k, sms)
        default_us = bench.config_us(default)
        best = bench.sweep(sms) if sweep else (default if default_us is not None else None)
        best_us = bench.times[best] if best is not None else float("nan")
        default_us = default_us if default_us is not None else float("nan")

        def fraction(us: float, nb: int = nbytes) -> float:
            return round(nb / (us * 1e-6) / (gbps * 1e9), 3)

        row = GemmRow(proj.op, m, proj.n, proj.k, proj.per_step, nbytes, round(torch_us, 2),
                      round(default_us, 2), default.label(), round(best_us, 2),
                      best.label() if best is not None else "none", fraction(torch_us),
                      fraction(default_us), fraction(best_us), bench.wrong, best)
        logger.info("%s M=%d: torch %.1f us (%.2f), default %.1f us (%.2f), best %s %.1f us "
                    "(%.2f)", proj.op, m, torch_us, row.torch_fraction, default_us,
                    row.default_fraction, row.best_config, best_us, row.best_fraction)
        out.append(row)
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def step_sums(rows: list[GemmRow], gbps: float, dtype: torch.dtype) -> list[dict[str, float]]:
    """Per M: a decode step's products summed (calls x time) and the weight-bytes floor."""
    sums = []
    for m in sorted({r.rows for r in rows}):
        mine = [r for r in rows if r.rows == m]
        weight_bytes = sum(r.per_step * r.n * r.k * dtype.itemsize for r in mine)
        floor_ms = 1e3 * weight_bytes / (gbps * 1e9)
        entry = {"rows": m, "weight_bytes": weight_bytes, "floor_ms": round(floor_ms, 4)}
        for name, pick in (("torch", lambda r: r.torch_us), ("default", lambda r: r.default_us),
                           ("best", lambda r: r.best_us),
                           ("best_of_both", lambda r: min(r.torch_us, r.best_us))):
            ms = sum(r.per_step * pick(r) for r in mine) / 1e3
            entry[f"{name}_ms"] = round(ms, 4)
            entry[f"{name}_over_floor"] = round(ms / floor_ms, 3)
        sums.append(entry)
    return sums


def tuned_lines(rows: list[GemmRow]) -> list[str]:
    """model/skinny_gemm.py TUNED entries for the sweep's winners (keyed by row block)."""
    lines = []
    for r in rows:
        if r.best is None:
            continue
        key = (row_block(r.rows, r.rows > FMA_MAX_ROWS), r.n, r.k)
        b = r.best
        lines.append(f"    {key}: SkinnyConfig({b.block_n}, {b.block_k}, {b.split_k}, "
                     f"{b.use_dot}, {b.num_warps}, {b.num_stages}),  # {r.op}: "
                     f"{r.best_fraction:.2f} of copy vs torch {r.torch_fraction:.2f}")
    return lines


def format_table(rows: list[GemmRow], sums: list[dict[str, float]]) -> str:
    lines = ["| op | M | N x K | torch us (frac) | default us (frac) | best us (frac) | best |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.rows} | {r.n} x {r.k} | {r.torch_us:.1f} "
                     f"({r.torch_fraction:.2f}) | {r.default_us:.1f} ({r.default_fraction:.2f}) "
                     f"| {r.best_us:.1f} ({r.best_fraction:.2f}) | {r.best_config} |")
    lines += ["", "| M | floor ms | torch ms (x floor) | default ms | best ms | best of both |",
              "|---|---|---|---|---|---|"]
    for s in sums:
        lines.append(f"| {s['rows']} | {s['floor_ms']:.3f} | {s['torch_ms']:.3f} "
                     f"({s['torch_over_floor']:.2f}) | {s['default_ms']:.3f} "
                     f"({s['default_over_floor']:.2f}) | {s['best_ms']:.3f} "
                     f"({s['best_over_floor']:.2f}) | {s['best_of_both_ms']:.3f} "
                     f"({s['best_of_both_over_floor']:.2f}) |")
    return "\n".join(lines)


def _rows(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1 or max(values) > 64:
        raise argparse.ArgumentTypeError(f"want row counts in 1..64, comma-separated: {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.skinny_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="a preset, folder or .gguf (its shapes)")
    p.add_argument("--rows", type=_rows, default=[1, 16, 64], help="M values, comma-separated")
    p.add_argument("--ops", default=None, help="only these projections, e.g. o,down")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-sweep", action="store_true", help="torch and the default config only")
    p.add_argument("--iters", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--json-out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench.skinny_gemm needs a CUDA device")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    projs = projections(peek_model_config(args.model))
    if args.ops:
        wanted = set(args.ops.split(","))
        projs = [p for p in projs if p.op in wanted]
    gbps = measure_copy_gbps(device)
    rows = []
    with torch.inference_mode():
        for proj in projs:
            rows += measure(proj, args.rows, dtype, device, gbps, not args.no_sweep, args.iters)
    sums = step_sums(rows, gbps, dtype) if not args.ops else []
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write), {args.model}, {args.dtype}, "
          f"{torch.cuda.get_device_name(device)}")
    print(format_table(rows, sums))
    print("TUNED entries (model/skinny_gemm.py):")
    print("\n".join(tuned_lines(rows)))
    if args.json_out:
        record = {
            "bench": "skinny_gemm", "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "model": args.model, "dtype": args.dtype,
            "copy_gbps": round(gbps, 1), "sweep": not args.no_sweep,
            "rows": [{k: v for k, v in asdict(r).items() if k != "best"} for r in rows],
            "step": sums, "tuned": tuned_lines(rows),
        }
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
