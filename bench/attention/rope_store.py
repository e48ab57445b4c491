"""`attnserve bench attention --op rope_store`: the fused rotary + K/V store kernel per layout.

Each case is one layer's call at serving shapes: a prompt chunk (its tokens' slots
consecutive, from a page start or from mid-run) and a decode batch (one token per sequence,
scattered slots). A row's bytes are q read + written, k and v read and written to the pool,
and the cos|sin rows read; its roofline fraction is against the copy bandwidth measured in
the same run. hnd is the peer to compare hnd_x with: the same bytes, contiguous per token.
Every case is checked after timing: q_out and the stored slots against float32 torch.

  attnserve bench attention --op rope_store --json-out rope_store.json
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass

import torch

from attention.triton.rope_store import rope_store
from bench.attention.common import (
    device_record,
    format_table,
    make_row,
    measure_ceilings,
    time_graph_us,
    write_json,
)
from kvcache.layout import KVLayout
from kvcache.pool import read_slots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreCase:
    name: str  # "prompt", "prompt_mid_run" or "decode"
    num_tokens: int


CASES = (
    StoreCase("prompt", 512),
    StoreCase("prompt", 2048),
    StoreCase("prompt_mid_run", 2048),
    StoreCase("decode", 64),
    StoreCase("decode", 256),
)


def _slots(case: StoreCase, layout: KVLayout, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    P = layout.page_size
    if case.name == "decode":  # each token the next slot of its own sequence, on its own page
        pages = torch.randperm(num_pages, generator=gen)[: case.num_tokens]
        return pages * P + torch.randint(0, P, (case.num_tokens,), generator=gen)
    # a prompt's pages are shuffled like a real block table's; its slots follow them in order
    start = 3 if case.name == "prompt_mid_run" else 0
    pages = torch.randperm(num_pages, generator=gen)[: (start + case.num_tokens + P - 1) // P]
    flat = (pages[:, None] * P + torch.arange(P)[None, :]).reshape(-1)
    return flat[start : start + case.num_tokens]


def _rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rotary_table(head_dim: int, positions: int, device: torch.device) -> torch.Tensor:
    """cos | sin rows [positions, head_dim] of the default rotary base."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], -1).to(device)


def case_call_args(
    case: StoreCase, layout: KVLayout, num_pages: int, k_cache: torch.Tensor,
    v_cache: torch.Tensor, cos_sin: torch.Tensor, num_q_heads: int, gen: torch.Generator,
) -> tuple:
    """`rope_store`'s arguments for one case: random q/k/v of the caches' dtype and device,
    positions anywhere in the rotary table, slots as `_slots` lays them out."""
    T, device, dtype = case.num_tokens, k_cache.device, k_cache.dtype
    Hkv, D = layout.num_kv_heads, layout.head_dim
    slots = _slots(case, layout, num_pages, gen).to(device)
    positions = torch.randint(0, cos_sin.shape[0], (T,), generator=gen).to(device)
    q = torch.randn(T, num_q_heads, D, generator=gen).to(device, dtype)
    k = torch.randn(T, Hkv, D, generator=gen).to(device, dtype)
    v = torch.randn(T, Hkv, D, generator=gen).to(device, dtype)
    return q, k, v, positions, cos_sin, slots, k_cache, v_cache, layout, torch.empty_like(q)


def _check(call_args: tuple) -> float:
    """Max abs error of q_out and the stored K/V against float32 torch (after the timing
    runs, which all store the same values)."""
    q, k, v, positions, cos_sin, slots, k_cache, v_cache, layout, q_out = call_args
    cs = cos_sin[positions]
    errors = [
        (q_out.float() - _rotate(q, cs)).abs().max(),
        (read_slots(k_cache, layout, slots).float() - _rotate(k, cs)).abs().max(),
        (read_slots(v_cache, layout, slots).float() - v.float()).abs().max(),
    ]
    return max(float(e) for e in errors)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnserve bench attention --op rope_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--layouts",
        default="token:1,nhd:16,hnd:16,hnd_x:16,hnd_x:64",
        help="comma list of layout:page_size (default %(default)s)",
    )
    ap.add_argument("--num-q-heads", type=int, default=32, help="query heads (default 32)")
    ap.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    ap.add_argument("--json-out", default=None, help="write the run (device, rows) here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and slots")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.num_kv_heads < 1 or args.num_q_heads % args.num_kv_heads:
        ap.error(f"--num-q-heads {args.num_q_heads} is not a multiple of --num-kv-heads "
                 f"{args.num_kv_heads}")
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = torch.bfloat16
    Hq, Hkv, D = args.num_q_heads, args.num_kv_heads, args.head_dim
    ceilings = measure_ceilings(device)
    gen = torch.Generator().manual_seed(args.seed)
    cos_sin = rotary_table(D, 8192, device)
    rows = []
    for spec in args.layouts.split(","):
        name, page = spec.split(":")
        layout = KVLayout.create(name, int(page), Hkv, D, "bfloat16")
        num_pages = max(4096 // layout.page_size, 2 * max(c.num_tokens for c in CASES))
        k_cache = torch.zeros(layout.cache_shape(num_pages), dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        for case in CASES:
            T = case.num_tokens
            call_args = case_call_args(case, layout, num_pages, k_cache, v_cache, cos_sin, Hq, gen)
            time_us = time_graph_us(functools.partial(rope_store, *call_args))
            error = _check(call_args)
            nbytes = T * (2 * Hq * D * 2 + 4 * Hkv * D * 2 + D * 4)
            rows.append(
                make_row(
                    op="rope_store",
                    backend="triton",
                    layout=layout.name,
                    page_size=layout.page_size,
                    variant=case.name,
                    batch=T if case.name == "decode" else 1,
                    context=T,
                    new_tokens=T,
                    time_us=time_us,
                    nbytes=nbytes,
                    flops=0.0,
                    ceilings=ceilings,
                    extra={"max_abs_err": round(error, 5)},
                )
            )
            logger.info("%s/%d %s T=%d: %.1f us", layout.name, layout.page_size, case.name, T, time_us)
    print(format_table(rows))
    worst = max(r.extra["max_abs_err"] for r in rows)
    if worst > 0.05:
        logger.error("a stored value is off by %.3g (bf16 rounding is < 0.05 here)", worst)
        return 1
    if args.json_out:
        write_json(args.json_out, device_record(ceilings, rows))
    return 0


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main(sys.argv[1:]))
