"""`attnserve bench attention --op mla-decode|mla-prefill`: the Triton MLA kernel against
torch SDPA on the expanded (decompressed) K/V of the same inputs, in the same run (GPU).

For each head count x shape x page size: random DeepSeek-style inputs (bench/attention/
mla_problem.py) in the latent form, the Triton kernel (absorbed, split-KV for decode, the
launch the `triton` MLA backend plans) on shuffled pages, and once per shape SDPA on
per-head K/V expanded from the same latent (flash backend when it takes the shapes, else
torch's own choice, named in the row). The latent output times W_UV is checked against
SDPA's. FlashMLA is measured too when `flash_mla` is importable. Rows follow the usual
schema plus `num_heads`, `kv_lora_rank`, `rope_dim`; bytes and FLOPs are each kernel's own
(latent: rows read once, rank + rope + rank per key and head; expanded: K and V per head).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from attention.mla.kernels import MLAKernelConfig, choose_num_splits, mla_attention
from attention.triton.decode import SplitBuffers
from bench.attention.common import (
    BenchRow,
    DeviceCeilings,
    device_record,
    format_table,
    make_row,
    measure_ceilings,
    time_graph_us,
    write_json,
)
from bench.attention.mla_problem import MLAProblem, MLAShape, make_mla_problem, paged_rows

logger = logging.getLogger(__name__)

CHECK_TOLERANCE = 3e-2  # bf16 inputs, two differently associated sums: relative to max |out|


def build_parser(op: str) -> argparse.ArgumentParser:
    decode = op == "mla-decode"
    ap = argparse.ArgumentParser(prog=f"attnserve bench attention --op {op}",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="16,128", help="comma-separated head counts")
    ap.add_argument("--shapes", default="64x4096,1x32768,128x4096" if decode else
                    "1x4096,4x2048,1x8192x1024",
                    help="BxL (decode: 1 query; prefill: L new tokens) or BxLxN (N new)")
    ap.add_argument("--page-sizes", default="1,16,64", help="latent cache page sizes")
    ap.add_argument("--kv-lora-rank", type=int, default=512)
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--nope-dim", type=int, default=128, help="qk_nope_head_dim")
    ap.add_argument("--v-dim", type=int, default=128, help="v_head_dim")
    ap.add_argument("--splits", type=int, default=None, help="force the decode KV splits")
    ap.add_argument("--config", default=None,
                    help="force the kernel launch: BLOCK_M,BLOCK_N,WARPS,STAGES (e.g. 16,32,4,2)")
    ap.add_argument("--no-peers", action="store_true", help="skip SDPA and FlashMLA")
    ap.add_argument("--json-out", default=None, help="write the run (device, rows) here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    return ap


def triton_fn(p: MLAProblem, cache: torch.Tensor, table: torch.Tensor, splits: int,
              config: MLAKernelConfig) -> tuple[Callable[[], Any], torch.Tensor]:
    B, L, N = p.shape.batch, p.shape.context, p.shape.new_tokens
    dev = p.q.device
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    decode = N == 1
    indptr = None if decode else torch.arange(0, B * N + 1, N, dtype=torch.int32, device=dev)
    out = torch.empty(B * N, p.num_heads, p.rank, device=dev, dtype=p.q.dtype)
    buffers = SplitBuffers.empty(dev)
    buffers.ensure(B * N, p.num_heads, splits, p.rank)

    def fn() -> torch.Tensor:
        return mla_attention(p.q, cache, p.rank, indptr, lens, table, out, p.scale, N, splits,
                             buffers, config)

    return fn, out


def sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            shape: MLAShape) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA on expanded K/V: the flash backend if it takes q/k of 192 and v of 128, else
    torch's own choice of backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    N, L = shape.new_tokens, shape.context
    mask = None if N == 1 else causal_lower_right(N, L)

    def call() -> torch.Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def flash() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return call()

    try:
        flash()
        return flash, "sdpa_flash"
    except RuntimeError as exc:
        logger.info("SDPA flash rejected the MLA shapes (%s); torch picks the backend", exc)
    call()
    return call, "sdpa"


def flash_mla_fn(p: MLAProblem, cache: torch.Tensor,
                 table: torch.Tensor) -> Callable[[], Any] | None:
    """FlashMLA (pages of 64, decode) when the `flash_mla` package is importable."""
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    except ImportError:
        return None
    B, N, H = p.shape.batch, p.shape.new_tokens, p.num_heads
    lens = torch.full((B,), p.shape.context, dtype=torch.int32, device=p.q.device)
    meta, splits = get_mla_metadata(lens, N * H, 1)
    q = p.q.view(B, N, H, -1)
    kcache = cache.unsqueeze(2)  # [pages, 64, 1, 576]

    def fn() -> Any:
        return flash_mla_with_kvcache(q, kcache, table, lens, p.rank, meta, splits,
                                      softmax_scale=p.scale, causal=True)

    return fn


def _row(p: MLAProblem, backend: str, layout: str, page_size: int, time_us: float,
         nbytes: int, flops: int, ceilings: DeviceCeilings, op: str,
         extra: dict[str, Any]) -> BenchRow:
    s = p.shape
    return make_row(op=op, backend=backend, layout=layout, page_size=page_size,
                    variant="softmax", batch=s.batch, context=s.context,
                    new_tokens=s.new_tokens, time_us=time_us, nbytes=nbytes, flops=flops,
                    ceilings=ceilings, extra=extra)


def run_problem(args: argparse.Namespace, op: str, p: MLAProblem, ceilings: DeviceCeilings,
                gen: torch.Generator, num_sms: int) -> list[BenchRow]:
    rows: list[BenchRow] = []
    config = MLAKernelConfig.for_device(p.num_heads, on_gpu=True)
    if args.config:
        m, n, warps, stages = (int(x) for x in args.config.split(","))
        config = MLAKernelConfig(block_m=m, block_n=n, num_warps=warps, num_stages=stages)
    decode = p.shape.new_tokens == 1
    splits = 1
    if decode:
        splits = args.splits or choose_num_splits(p.shape.batch, p.num_heads, p.shape.context,
                                                  num_sms, config)
    sdpa_us, sdpa_out, sdpa_name = None, None, ""
    if not args.no_peers:
        try:
            q, k, v = p.expand()
            fn, sdpa_name = sdpa_fn(q, k, v, p.scale, p.shape)
            sdpa_us = time_graph_us(fn)
            sdpa_out = fn().float()
            del q, k, v
            rows.append(_row(p, sdpa_name, "contiguous", 0, sdpa_us, p.expanded_bytes(),
                             p.expanded_flops(), ceilings, op, {}))
        except torch.cuda.OutOfMemoryError:
            logger.warning("SDPA peer: the expanded K/V do not fit; no peer for this shape")
        torch.cuda.empty_cache()
    for page_size in [int(x) for x in args.page_sizes.split(",")]:
        cache, table = paged_rows(p.rows, page_size, gen)
        fn, out = triton_fn(p, cache, table, splits, config)
        us = time_graph_us(fn)
        extra: dict[str, Any] = {"splits": splits, "block_m": config.block_m,
                                 "block_n": config.block_n, "num_warps": config.num_warps,
                                 "num_stages": config.num_stages}
        if sdpa_us is not None and sdpa_out is not None:
            fn()
            got = p.project_out(out)
            err = ((got - sdpa_out).abs().max() / sdpa_out.abs().max()).item()
            extra.update(speedup_vs_sdpa=round(sdpa_us / us, 3), peer=sdpa_name,
                         check_rel_err=round(err, 5))
            if err > CHECK_TOLERANCE:
                raise AssertionError(f"MLA kernel differs from SDPA on expanded K/V: {err}")
        if page_size == 64 and decode and not args.no_peers:
            flash = flash_mla_fn(p, cache, table)
            if flash is not None:
                flash_us = time_graph_us(flash)
                rows.append(_row(p, "flash_mla", "latent", 64, flash_us, p.latent_bytes(),
                                 p.latent_flops(), ceilings, op, {}))
                extra["ratio_to_flash_mla"] = round(flash_us / us, 3)
        rows.append(_row(p, "triton", "latent", page_size, us, p.latent_bytes(),
                         p.latent_flops(), ceilings, op, extra))
        del cache, table
    return rows


def main(argv: list[str]) -> int:
    op = "mla-prefill" if "mla-prefill" in argv else "mla-decode"
    argv = [a for a in argv if a not in ("--op", "mla-decode", "mla-prefill")]
    args = build_parser(op).parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench attention --op mla-*: needs a CUDA device")
    ceilings = measure_ceilings(device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    gen = torch.Generator(device=device).manual_seed(args.seed)
    decode = op == "mla-decode"
    rows: list[BenchRow] = []
    fields: list[dict[str, int]] = []
    for heads in [int(h) for h in args.heads.split(",")]:
        for text in args.shapes.split(","):
            shape = MLAShape.parse(text, decode)
            p = make_mla_problem(shape, heads, args.kv_lora_rank, args.rope_dim, args.nope_dim,
                                 args.v_dim, device, gen)
            got = run_problem(args, op, p, ceilings, gen, num_sms)
            rows.extend(got)
            fields.extend({"num_heads": heads, "kv_lora_rank": args.kv_lora_rank,
                           "rope_dim": args.rope_dim} for _ in got)
            del p
            torch.cuda.empty_cache()
            print(format_table(got), flush=True)
    if args.json_out:
        record = device_record(ceilings, rows)
        record["rows"] = [asdict(r) | f for r, f in zip(rows, fields, strict=True)]
        record["op"] = op
        write_json(args.json_out, record)
    return 0
