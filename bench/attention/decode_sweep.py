"""Launch-configuration sweep of the Triton decode kernel (GPU), used to pick
`default_decode_config` and the split heuristic in `choose_num_splits`.

    python -m bench.attention.decode_sweep --shapes 64x4096,1x32768 --json-out sweep.json

For every shape x layout x page size it times each (BLOCK_N, warps, stages) config at the
heuristic's split count, then the best config at other split counts, and prints the
fraction of the copy bandwidth each reaches.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import torch

from attention.triton.decode import DecodeConfig, choose_num_splits
from attention.variants import Variant
from bench.attention.common import (
    build_paged_kv,
    measure_copy_gbps,
    parse_kv_cache_dtypes,
    time_graph_us,
)
from bench.attention.decode import Shape, make_problem, triton_run

logger = logging.getLogger(__name__)

CONFIGS = [DecodeConfig(32, 4, 3), DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 3),
           DecodeConfig(64, 4, 4), DecodeConfig(64, 8, 3), DecodeConfig(128, 4, 3),
           DecodeConfig(128, 8, 2)]
# hnd_x also tries its other tile loads (DecodeConfig.x_mode)
X_CONFIGS = [DecodeConfig(bn, w, st, 1) for bn, w, st in ((32, 4, 3), (32, 4, 2), (32, 4, 4),
                                                          (64, 4, 3), (32, 8, 3), (16, 4, 3))] + [
    DecodeConfig(32, 4, 3, 2), DecodeConfig(128, 4, 3, 2), DecodeConfig(64, 4, 2, 0)]
# FP8 pages: tiles of more keys too (a key is half the bytes)
FP8_CONFIGS = [DecodeConfig(128, 4, 4), DecodeConfig(128, 8, 3), DecodeConfig(128, 8, 4),
               DecodeConfig(256, 8, 2), DecodeConfig(256, 8, 3)]


def best_per_layout(results: list[dict]) -> dict[str, str]:
    """Per layout name, the config with the best geometric-mean copy fraction over the
    shapes, at the split count the heuristic picks (`BLOCK_N,WARPS,STAGES,X_MODE`)."""
    fractions: dict[str, dict[tuple, list[float]]] = {}
    for r in results:
        if r["splits"] != r["heuristic_splits"]:
            continue
        key = (r["block_n"], r["warps"], r["stages"], r["x_mode"])
        fractions.setdefault(r["layout"].split(":")[0], {}).setdefault(key, []).append(
            r["copy_fraction"])
    best = {}
    for layout, by_config in fractions.items():
        most = max(len(v) for v in by_config.values())
        complete = {k: v for k, v in by_config.items() if len(v) == most}
        top = max(complete, key=lambda k: sum(math.log(f) for f in complete[k]) / most)
        best[layout] = ",".join(str(x) for x in top)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attention.decode_sweep")
    ap.add_argument("--shapes", default="64x4096,16x16384,256x1024,1x32768")
    ap.add_argument("--layouts", default="token:1,nhd:16,hnd:16,hnd_x:16,nhd:64")
    ap.add_argument("--extra-splits", default="",
                    help="comma-separated split counts timed for the best config besides the "
                         "default set (1, 2, 4, ..., 64 and half/double the heuristic's)")
    ap.add_argument("--num-q-heads", type=int, default=32, help="query heads (default 32)")
    ap.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="the pages' storage: auto (q's dtype, bf16) or fp8 / fp8_e4m3")
    ap.add_argument("--kv-cache-scale", default="per-token-head",
                    help="FP8 scales: per-token-head (default) or per-tensor")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    if hkv < 1 or hq % hkv:
        ap.error(f"--num-q-heads {hq} is not a multiple of --num-kv-heads {hkv}")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    copy_gbps = measure_copy_gbps(device)
    gen = torch.Generator(device=device).manual_seed(1)
    results = []
    print(f"copy {copy_gbps:.0f} GB/s, {num_sms} SMs")
    for text in args.shapes.split(","):
        shape = Shape.parse(text)
        p = make_problem(shape, hq, hkv, d, device, gen)
        kv_dtype = parse_kv_cache_dtypes(args.kv_cache_dtype, args.kv_cache_scale, p.q.dtype)[0]
        for spec in args.layouts.split(","):
            layout, _, ps = spec.partition(":")
            paged = build_paged_kv(p.k, p.v, [shape.context] * shape.batch, layout, int(ps),
                                   generator=gen, kv_dtype=kv_dtype)
            nbytes = p.paged_nbytes(paged)
            timings: dict[tuple[DecodeConfig, int], float] = {}
            configs = CONFIGS if layout != "hnd_x" else (
                [c for c in CONFIGS if c.block_n >= 64] + X_CONFIGS)
            if kv_dtype.is_fp8:
                configs = configs + FP8_CONFIGS
            for cfg in configs:
                splits = choose_num_splits(shape.batch, hkv, shape.context, num_sms, cfg.block_n)
                try:
                    timings[(cfg, splits)] = time_graph_us(
                        triton_run(p, paged, Variant(), num_sms, cfg, splits).fn)
                except Exception as exc:  # noqa: BLE001 - a config may not compile
                    logger.warning("%s %s %s: %s", shape, spec, cfg, exc)
            best_cfg = min(timings, key=timings.__getitem__)[0]
            heur = choose_num_splits(shape.batch, hkv, shape.context, num_sms, best_cfg.block_n)
            extra = {int(x) for x in args.extra_splits.split(",") if x}
            for splits in sorted({1, 2, 4, 8, 16, 32, 64, heur // 2, heur * 2, *extra} - {0}):
                if splits * best_cfg.block_n > shape.context or (best_cfg, splits) in timings:
                    continue
                timings[(best_cfg, splits)] = time_graph_us(
                    triton_run(p, paged, Variant(), num_sms, best_cfg, splits).fn)
            for (cfg, splits), us in sorted(timings.items(), key=lambda kv: kv[1]):
                frac = nbytes / (us * 1e-6) / 1e9 / copy_gbps
                results.append(dict(shape=text, layout=spec, block_n=cfg.block_n,
                                    x_mode=cfg.x_mode, kv_cache_dtype=paged.kv_dtype_name,
                                    warps=cfg.num_warps, stages=cfg.num_stages, splits=splits,
                                    heuristic_splits=heur, time_us=round(us, 2),
                                    copy_fraction=round(frac, 4)))
            top = sorted(timings.items(), key=lambda kv: kv[1])[:4]
            print(f"{text:>9} {spec:8} heur_splits={heur:<3} " + "  ".join(
                f"[n{c.block_n}w{c.num_warps}s{c.num_stages}m{c.x_mode} "
                f"x{s}: {us:.1f}us "
                f"{nbytes / (us * 1e-6) / 1e9 / copy_gbps:.3f}]" for (c, s), us in top),
                flush=True)
            del paged
        del p
        torch.cuda.empty_cache()
    for layout, config in best_per_layout(results).items():
        print(f"best {layout}={config}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps,
                       "heads": [hq, hkv], "head_dim": d, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
