"""`attnserve bench attention --op linear-decode|linear-prefill`: the Triton lightning-attention
kernels (attention/linear) against the device ceilings, the torch reference and fla's
kernels, all measured in the same run (GPU).

decode: per batch size, one token per sequence over a float32 state pool; bytes counted are
the state read and written (2 x B*H*D*D*4) plus q, k, v and o; the fraction is of the
device copy bandwidth measured in the run. Every kernel launch config of the sweep is one
row (graph-replayed, so launch latency stays out); the best is the summary's.
prefill: per BxL (or BxLxP: P tokens already folded into a nonzero initial state), ragged
extend of B sequences; FLOPs counted as the chunk-64 algorithm's 4*64*D + 4*D*D per token
and head (fla's chunk size too), so TFLOP/s compare across implementations; the fraction
is of the bf16 matmul rate measured in the run. One more row times the best config with
state snapshots every --snapshot-every tokens.
Each kernel's output and final states are checked against the torch reference (fla's
too): `check_rel_err` is max |diff| / max |reference|.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attention.linear import (
    DecodeConfig,
    ExtendConfig,
    lightning_decode,
    lightning_decode_reference,
    lightning_extend,
    lightning_extend_reference,
    slopes_for_layer,
)
from bench.attention.common import (
    BenchRow,
    DeviceCeilings,
    device_record,
    format_table,
    make_row,
    measure_ceilings,
    time_cuda_us,
    time_graph_us,
    write_json,
)
from bench.attention.linear_peers import (
    PeerUnavailable,
    fla_decode,
    fla_prefill,
    fla_version,
    relative_error,
)

logger = logging.getLogger(__name__)

DECODE_SWEEP = "32,128,4;16,128,4;32,64,4;64,64,4;64,128,8;128,32,4"  # BLOCK_V,BLOCK_K,warps
EXTEND_SWEEP = ("64,32,4,2;64,16,4,2;64,32,8,2;64,32,4,3;64,64,4,2;64,64,8,2;64,64,8,3;"
                "64,128,8,2;32,64,4,2")  # CHUNK,BLOCK_V,warps,stages
CHECK_TOLERANCE = 2e-2  # bf16 operands (state, scores, keys) against the float32 reference
FLA_CHUNK = 64


def build_parser(op: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"attnserve bench attention --op {op}",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=64, help="heads (MiniMax-Text-01: 64)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of q, k, v")
    ap.add_argument("--layer", type=int, default=0, help="which layer's decay rates")
    ap.add_argument("--num-layers", type=int, default=80,
                    help="layers of the model the decay rates are for (MiniMax-Text-01: 80)")
    ap.add_argument("--batches", default="64,256", help="decode batch sizes")
    ap.add_argument("--shapes", default="8x4096,1x8192,2x4096x8192",
                    help="prefill: BxL (L new tokens) or BxLxP (after a P-token prefix)")
    ap.add_argument("--configs", default=None,
                    help=f"launch configs, ';'-separated (decode default {DECODE_SWEEP}; "
                         f"prefill default {EXTEND_SWEEP})")
    ap.add_argument("--snapshot-every", type=int, default=1024,
                    help="prefill: also time snapshots every N tokens (0: no such row)")
    ap.add_argument("--no-peers", action="store_true", help="skip fla")
    ap.add_argument("--no-reference", action="store_true", help="do not time the reference")
    ap.add_argument("--json-out", default=None, help="write the run (device, rows, summary) here")
    ap.add_argument("--seed", type=int, default=0, help="input seed")
    ap.add_argument("--device", default="cuda", help="CUDA device")
    return ap


def _qkv(T: int, H: int, D: int, device: torch.device, gen: torch.Generator):
    # the model feeds silu-activated projections
    return [torch.nn.functional.silu(torch.randn(T, H, D, device=device, generator=gen))
            .to(torch.bfloat16) for _ in range(3)]


def _row(op: str, backend: str, layout: str, batch: int, context: int, new: int,
         time_us: float, nbytes: float, flops: float, ceilings: DeviceCeilings,
         extra: dict[str, Any]) -> BenchRow:
    return make_row(op=op, backend=backend, layout=layout, page_size=0, variant="lightning",
                    batch=batch, context=context, new_tokens=new, time_us=time_us,
                    nbytes=nbytes, flops=flops, ceilings=ceilings, extra=extra)


@dataclass
class RunNotes:
    skipped: dict[str, str] = field(default_factory=dict)  # peer or config -> why
    failures: list[str] = field(default_factory=list)  # Triton results off the reference


def _check(name: str, errors: dict[str, float], notes: RunNotes) -> float:
    """The worst relative error; above CHECK_TOLERANCE it is logged and added to the
    failures (the run goes on, so the other configs are still measured, and exits 1)."""
    worst = max(errors.values())
    if not worst <= CHECK_TOLERANCE:  # NaN fails too
        notes.failures.append(f"{name}: {errors}")
        logger.error("%s differs from the reference: %s", name, errors)
    return round(worst, 5)


def _peer_agrees(name: str, errors: dict[str, float], notes: RunNotes) -> float | None:
    """A peer that computes something else is no peer: skipped with its error."""
    worst = max(errors.values())
    if not worst <= CHECK_TOLERANCE:
        notes.skipped[name] = f"differs from the reference: {errors}"
        logger.warning("%s differs from the reference: %s", name, errors)
        return None
    return round(worst, 5)


def _peer(name: str, build: Callable[[], tuple[Callable, Callable]], notes: RunNotes):
    try:
        return build()
    except (PeerUnavailable, RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        logger.warning("%s unavailable: %s", name, reason)
        notes.skipped[name] = reason
        return None


# ----------------------------------------------------------------------------- decode


def run_decode(args, B: int, ceilings: DeviceCeilings, gen: torch.Generator,
               configs: list[DecodeConfig], notes: RunNotes) -> list[BenchRow]:
    H, D, dev = args.heads, args.head_dim, torch.device(args.device)
    slopes = slopes_for_layer(H, args.layer, args.num_layers).to(dev)
    q, k, v = _qkv(B, H, D, dev, gen)
    pool0 = 0.1 * torch.randn(B + 1, H, D, D, device=dev, generator=gen)  # slot 0: scratch
    slots = (torch.randperm(B, device=dev, generator=gen) + 1).to(torch.int32)
    ref_pool = pool0.clone()
    ref_out = lightning_decode_reference(q, k, v, slopes, ref_pool, slots)
    ref_states = ref_pool[slots.long()]
    nbytes = 2 * B * H * D * D * 4 + 4 * B * H * D * q.element_size()
    flops = 4 * B * H * D * D
    rows: list[BenchRow] = []

    def add(backend: str, layout: str, us: float, extra: dict[str, Any]) -> None:
        rows.append(_row("linear-decode", backend, layout, B, 0, 1, us, nbytes, flops,
                         ceilings, extra))

    for cfg in configs:
        pool = pool0.clone()
        out = torch.empty_like(q)
        lightning_decode(q, k, v, slopes, pool, slots, config=cfg, out=out)
        err = _check(f"triton decode {cfg}", {
            "out": relative_error(out, ref_out),
            "states": relative_error(pool[slots.long()], ref_states)}, notes)
        us = time_graph_us(lambda c=cfg, p=pool, o=out: lightning_decode(
            q, k, v, slopes, p, slots, config=c, out=o))
        add("triton", "state_pool", us, {**asdict(cfg), "check_rel_err": err})
        del pool
    if not args.no_reference:
        pool = pool0.clone()
        us = time_graph_us(lambda: lightning_decode_reference(q, k, v, slopes, pool, slots))
        add("reference", "state_pool", us, {})
        del pool
    if not args.no_peers:
        init = pool0[slots.long()].contiguous()
        built = _peer("fla", lambda: fla_decode(q, k, v, slopes, init), notes)
        if built is not None:
            timed, checked = built
            out, final = checked()
            err = _peer_agrees("fla", {"out": relative_error(out, ref_out),
                                       "states": relative_error(final, ref_states)}, notes)
            if err is not None:
                add("fla", "dense_states", time_graph_us(timed),
                    {"check_rel_err": err, "kernel": "fused_recurrent_simple_gla"})
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- prefill


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = [int(x) for x in text.split("x")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"bad prefill shape {text!r}: want BxL or BxLxP")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 0


def run_prefill(args, shape: str, ceilings: DeviceCeilings, gen: torch.Generator,
                configs: list[ExtendConfig], notes: RunNotes) -> list[BenchRow]:
    B, L, P = _parse_shape(shape)
    H, D, dev = args.heads, args.head_dim, torch.device(args.device)
    slopes = slopes_for_layer(H, args.layer, args.num_layers).to(dev)
    T = B * L
    q, k, v = _qkv(T, H, D, dev, gen)
    indptr_host = list(range(0, T + 1, L))
    indptr = torch.tensor(indptr_host, dtype=torch.int32, device=dev)
    prefixes = [P] * B
    every = args.snapshot_every
    snaps_per_seq = len(range((P // every + 1) * every, P + L + 1, every)) if every else 0
    num_slots = 1 + B + B * snaps_per_seq
    pool0 = torch.zeros(num_slots, H, D, D, device=dev)
    if P:
        pool0[1 : B + 1] = 0.1 * torch.randn(B, H, D, D, device=dev, generator=gen)
    slots = torch.arange(1, B + 1, dtype=torch.int32, device=dev)
    snap_slots = torch.arange(B + 1, num_slots, dtype=torch.int32,
                              device=dev).view(B, snaps_per_seq)
    common = (indptr, indptr_host, prefixes, slopes)

    ref_pool = pool0.clone()
    ref_out = lightning_extend_reference(q, k, v, *common, ref_pool, slots, every,
                                         snap_slots if every else None)
    ref_final = ref_pool[slots.long()]
    flops = T * H * (4 * FLA_CHUNK * D + 4 * D * D)
    nbytes = 4 * T * H * D * q.element_size() + 2 * B * H * D * D * 4
    rows: list[BenchRow] = []
    fla_us: float | None = None

    def add(backend: str, layout: str, us: float, extra: dict[str, Any]) -> None:
        rows.append(_row("linear-prefill", backend, layout, B, P + L, L, us, nbytes, flops,
                         ceilings, extra))

    if not args.no_peers:
        init = pool0[slots.long()].contiguous()
        built = _peer("fla", lambda: fla_prefill(q, k, v, indptr_host, slopes, init), notes)
        if built is not None:
            timed, checked = built
            out, final = checked()
            err = _peer_agrees("fla", {"out": relative_error(out, ref_out),
                                       "states": relative_error(final, ref_final)}, notes)
            if err is not None:
                fla_us = time_cuda_us(timed)
                add("fla", "dense_states", fla_us, {"check_rel_err": err,
                                                    "kernel": "chunk_simple_gla"})
    best: tuple[float, ExtendConfig] | None = None
    for cfg in configs:
        pool = pool0.clone()
        try:
            out = lightning_extend(q, k, v, *common, pool, slots, config=cfg)
        except Exception as exc:  # noqa: BLE001  a config the compiler rejects: record, go on
            logger.warning("extend config %s failed: %s", cfg, str(exc).splitlines()[0][:200])
            notes.skipped[f"triton {asdict(cfg)}"] = str(exc).splitlines()[0][:200]
            continue
        err = _check(f"triton extend {cfg}", {"out": relative_error(out, ref_out),
                                              "states": relative_error(pool[slots.long()],
                                                                       ref_final)}, notes)
        us = time_cuda_us(lambda c=cfg, p=pool: lightning_extend(q, k, v, *common, p, slots,
                                                                 config=c))
        extra: dict[str, Any] = {**asdict(cfg), "check_rel_err": err}
        if fla_us is not None:
            extra["ratio_to_fla"] = round(fla_us / us, 3)
        add("triton", "state_pool", us, extra)
        if best is None or us < best[0]:
            best = (us, cfg)
        del pool
    if best is not None and every:
        cfg = best[1]
        pool = pool0.clone()
        lightning_extend(q, k, v, *common, pool, slots, every, snap_slots, config=cfg)
        err = _check("triton extend with snapshots", {
            "snapshots": relative_error(pool[B + 1:], ref_pool[B + 1:])}, notes)
        us = time_cuda_us(lambda: lightning_extend(q, k, v, *common, pool, slots, every,
                                                   snap_slots, config=cfg))
        add("triton", "state_pool", us, {**asdict(cfg), "check_rel_err": err,
                                         "snapshot_every": every})
        del pool
    if not args.no_reference:
        pool = pool0.clone()
        us = time_cuda_us(lambda: lightning_extend_reference(q, k, v, *common, pool, slots),
                          warmup=1, iters=3, min_warmup_ms=0.0)
        add("reference", "state_pool", us, {})
        del pool
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- main


def _configs(op: str, text: str | None) -> list:
    decode = op == "linear-decode"
    out = []
    for spec in (text or (DECODE_SWEEP if decode else EXTEND_SWEEP)).split(";"):
        nums = [int(x) for x in spec.split(",")]
        out.append(DecodeConfig(*nums) if decode else ExtendConfig(*nums))
    return out


def summarize(op: str, rows: list[BenchRow], ceilings: DeviceCeilings) -> list[dict[str, Any]]:
    """The best Triton row of each problem, with its peers' times beside it."""
    problems: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        problems.setdefault((r.batch, r.context, r.new_tokens), []).append(r)
    summary = []
    for (batch, context, new), group in problems.items():
        plain = [r for r in group if r.backend == "triton" and "snapshot_every" not in r.extra]
        if not plain:
            continue
        best = min(plain, key=lambda r: r.time_us)
        entry: dict[str, Any] = {"batch": batch, "context": context, "new_tokens": new,
                                 "triton_us": best.time_us,
                                 "config": {k: best.extra[k] for k in best.extra
                                            if k != "check_rel_err"}}
        if op == "linear-decode":
            entry.update(gbps=best.gbps, fraction_of_copy=round(best.gbps / ceilings.copy_gbps, 3))
        else:
            entry.update(tflops=best.tflops,
                         fraction_of_matmul=round(best.tflops / ceilings.matmul_tflops, 3))
        for peer in ("fla", "reference"):
            match = [r for r in group if r.backend == peer]
            if match:
                entry[f"{peer}_us"] = match[0].time_us
                entry[f"speedup_vs_{peer}"] = round(match[0].time_us / best.time_us, 3)
        summary.append(entry)
    return summary


def format_summary(op: str, summary: list[dict[str, Any]]) -> str:
    metric = "fraction_of_copy" if op == "linear-decode" else "fraction_of_matmul"
    rate = "gbps" if op == "linear-decode" else "tflops"
    lines = [f"{'batch':>5} {'ctx':>6} {'new':>5} {'triton_us':>10} {rate:>7} {metric:>18} "
             f"{'vs fla':>7} {'vs ref':>7}  config"]
    for e in summary:
        lines.append(f"{e['batch']:>5} {e['context']:>6} {e['new_tokens']:>5} "
                     f"{e['triton_us']:>10.1f} {e[rate]:>7.1f} {e[metric]:>18.3f} "
                     f"{e.get('speedup_vs_fla', '-'):>7} {e.get('speedup_vs_reference', '-'):>7}"
                     f"  {e['config']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    op = "linear-prefill" if "linear-prefill" in argv else "linear-decode"
    argv = [a for a in argv if a not in ("--op", "linear-decode", "linear-prefill")]
    args = build_parser(op).parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit(f"bench attention --op {op}: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    ceilings = measure_ceilings(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    configs = _configs(op, args.configs)
    notes = RunNotes()
    rows: list[BenchRow] = []
    with torch.inference_mode():
        if op == "linear-decode":
            for B in [int(b) for b in args.batches.split(",")]:
                rows.extend(run_decode(args, B, ceilings, gen, configs, notes))
        else:
            for shape in args.shapes.split(","):
                rows.extend(run_prefill(args, shape, ceilings, gen, configs, notes))
    summary = summarize(op, rows, ceilings)
    if args.json_out:
        record = device_record(ceilings, rows)
        record.update(op=op, heads=args.heads, head_dim=args.head_dim, layer=args.layer,
                      num_layers=args.num_layers, summary=summary, skipped=notes.skipped,
                      check_failures=notes.failures)
        try:
            record["fla_version"] = fla_version()
        except PeerUnavailable:
            record["fla_version"] = None
        write_json(args.json_out, record)
    print(format_table(rows))
    if notes.skipped:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in notes.skipped.items()))
    if notes.failures:
        print("CHECK FAILURES: " + "; ".join(notes.failures))
    print(format_summary(op, summary), flush=True)
    return 1 if notes.failures else 0
