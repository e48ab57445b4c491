"""`attnserve bench attention --op decode`: the Triton decode kernel vs its peers (GPU).

For each (batch, context) shape it draws random bf16 q/K/V, measures torch SDPA (flash
backend) and FlexAttention on the contiguous K/V, then the Triton kernel on paged K/V of
the same content in every requested layout and page size, and with `--kv-cache-dtype
auto,fp8` on bf16 and FP8 pages in the same run (FP8 rows carry `vs_bf16`, the bf16
kernel's time over theirs, same layout and page size). Bytes counted: K/V as stored, read
once (FP8: one byte a code plus the float32 per-(token, head) scales), q read, out
written. Roofline fraction: those bytes over the copy bandwidth measured in the same run,
divided by the measured time.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attention.triton.decode import (
    DecodeConfig,
    SplitBuffers,
    decode_attention,
    default_decode_config,
)
from attention.triton.variants import triton_variant
from attention.variants import Variant, alibi_slopes, apply_variant_torch, parse_variant
from bench.attention.common import (
    BenchRow,
    DeviceCeilings,
    PagedKV,
    build_paged_kv,
    dequantized,
    device_record,
    format_table,
    make_row,
    measure_ceilings,
    parse_kv_cache_dtypes,
    time_graph_us,
    write_json,
)
from bench.attention.decode_checks import ragged_checks
from bench.attention.read_bandwidth import measure_read_gbps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    batch: int
    context: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        b, _, c = text.partition("x")
        return cls(int(b), int(c))


@dataclass
class DecodeProblem:
    shape: Shape
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q: torch.Tensor  # [B, Hq, D]
    k: torch.Tensor  # [B, L, Hkv, D]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        e = self.q.element_size()
        kv = 2 * self.shape.batch * self.shape.context * self.num_kv_heads * self.head_dim * e
        return kv + 2 * self.q.numel() * e

    def paged_nbytes(self, paged: PagedKV) -> int:
        """Bytes a kernel on `paged` moves: K/V as stored (codes and scales), q and out."""
        kv = self.shape.batch * self.shape.context * paged.kv_bytes_per_token()
        return kv + 2 * self.q.numel() * self.q.element_size()

    @property
    def flops(self) -> int:
        return 4 * self.shape.batch * self.num_q_heads * self.shape.context * self.head_dim

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


def make_problem(shape: Shape, hq: int, hkv: int, d: int, device: torch.device,
                 gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> DecodeProblem:
    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    B, L = shape.batch, shape.context
    return DecodeProblem(shape, hq, hkv, d, rnd(B, hq, d), rnd(B, L, hkv, d), rnd(B, L, hkv, d))


# ----------------------------------------------------------------------------- peers


def sdpa_flash_fn(p: DecodeProblem) -> tuple[Callable[[], Any], str]:
    """SDPA with the flash backend on contiguous [B, H, L, D] K/V (GQA through enable_gqa,
    or with the group folded into the query length when this torch's flash lacks GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, D = p.q.shape
    k4 = p.k.transpose(1, 2).contiguous()
    v4 = p.v.transpose(1, 2).contiguous()
    q4 = p.q.view(B, Hq, 1, D)

    def gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k4, v4, scale=p.scale, enable_gqa=True)

    try:
        gqa()
        return gqa, "enable_gqa"
    except RuntimeError as exc:
        logger.info("SDPA flash rejected enable_gqa (%s); folding the group into q", exc)
    qf = p.q.view(B, p.num_kv_heads, Hq // p.num_kv_heads, D)

    def folded() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qf, k4, v4, scale=p.scale)

    folded()
    return folded, "group_as_rows"


def flex_fn(p: DecodeProblem) -> Callable[[], Any]:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    B, Hq, D = p.q.shape
    q4 = p.q.view(B, Hq, 1, D)
    k4 = p.k.transpose(1, 2).contiguous()
    v4 = p.v.transpose(1, 2).contiguous()
    return lambda: compiled(q4, k4, v4, scale=p.scale, enable_gqa=True)


# ----------------------------------------------------------------------------- triton


@dataclass
class TritonRun:
    fn: Callable[[], Any]
    out: torch.Tensor
    splits: int


def triton_run(p: DecodeProblem, paged: Any, variant: Variant, num_sms: int,
               config: DecodeConfig | None = None, splits: int | None = None) -> TritonRun:
    tv = triton_variant(variant)
    slopes = alibi_slopes(p.num_q_heads).float().to(p.q.device)
    cfg = config or default_decode_config(paged.layout, p.head_dim, True)
    if splits is None:
        splits = cfg.num_splits(p.shape.batch, p.num_kv_heads, p.shape.context, num_sms)
    out = torch.empty_like(p.q)
    buffers = SplitBuffers.empty(p.q.device)
    buffers.ensure(p.shape.batch, p.num_q_heads, splits, 1 << (p.head_dim - 1).bit_length())

    def fn() -> torch.Tensor:
        return decode_attention(p.q, paged.k_cache, paged.v_cache, paged.layout,
                                paged.block_table, paged.seq_lens, out, p.scale, tv, slopes,
                                splits, buffers, cfg, **paged.scales)

    return TritonRun(fn, out, splits)


def reference_out(p: DecodeProblem, variant: Variant) -> torch.Tensor:
    """float32 torch attention on the contiguous K/V (the variant through the torch oracle)."""
    B, Hq, D = p.q.shape
    G = Hq // p.num_kv_heads
    L = p.shape.context
    k = p.k.float().permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    scores = torch.matmul(p.q.float().view(B, p.num_kv_heads, G, D), k).view(B, Hq, 1, L)
    q_pos = torch.full((1, 1, 1, 1), L - 1, device=p.q.device)
    k_pos = torch.arange(L, device=p.q.device).view(1, 1, 1, L)
    visible = torch.ones(1, 1, 1, L, dtype=torch.bool, device=p.q.device)
    w = apply_variant_torch(variant, scores * p.scale, q_pos, k_pos, visible)
    out = torch.matmul(w.view(B, p.num_kv_heads, G, L), p.v.float().permute(0, 2, 1, 3))
    return out.view(B, Hq, D)


def _cells(args: argparse.Namespace, kv_dtypes: list[Any]) -> list[tuple[str, int, Any]]:
    """(layout, page size, KV cache dtype) of every paged run, bf16 before FP8 for each."""
    return [(layout, page_size, kv_dtype) for layout in args.layouts.split(",")
            for page_size in ([1] if layout == "token" else
                              [int(x) for x in args.page_sizes.split(",")])
            for kv_dtype in kv_dtypes]


def _dequantized_problem(p: DecodeProblem, kv_dtype: Any) -> DecodeProblem:
    """`p` with K/V as an FP8 cache of `kv_dtype` gives them back (p itself when not FP8)."""
    if not kv_dtype.is_fp8:
        return p
    return DecodeProblem(p.shape, p.num_q_heads, p.num_kv_heads, p.head_dim, p.q,
                         dequantized(p.k, kv_dtype), dequantized(p.v, kv_dtype))


def config_label(c: DecodeConfig) -> str:
    if c.gluon_hndx:
        return f"gluon-hndx-n{c.block_n}w{c.num_warps}"
    return f"n{c.block_n}w{c.num_warps}s{c.num_stages}m{c.x_mode}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="attnserve bench attention --op decode",
        description="Batch decode: the Triton kernel on every layout against the device's copy "
                    "bandwidth and torch peers on contiguous K/V, measured in the same run.")
    ap.add_argument("--shapes", default="64x4096,16x16384,256x1024,1x32768",
                    help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--layouts", default="token,nhd,hnd,hnd_x",
                    help="comma-separated KV layouts (token always has page size 1)")
    ap.add_argument("--page-sizes", default="16,64",
                    help="comma-separated page sizes for the paged layouts")
    ap.add_argument("--variants", default="softmax",
                    help="comma-separated, e.g. softmax,softcap:30,sliding_window:1024,alibi")
    ap.add_argument("--variant-shapes", default="",
                    help="shapes on which non-softmax variants run (default: all)")
    ap.add_argument("--variant-layouts", default="nhd",
                    help="layouts on which non-softmax variants run")
    ap.add_argument("--num-q-heads", type=int, default=32, help="query heads (default 32)")
    ap.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    ap.add_argument("--peers", default="sdpa,flex", help="comma-separated: sdpa, flex")
    ap.add_argument("--check", action="store_true",
                    help="first the ragged, NaN-poisoned checks of every variant on each layout "
                         "(bench.attention.decode_checks, float64 torch), then every timed "
                         "Triton output against float32 torch (rel. err < 1e-2)")
    ap.add_argument("--splits", type=int, default=None, help="force the number of KV splits")
    ap.add_argument("--config", default=None,
                    help="BLOCK_N,WARPS,STAGES[,X_MODE] launch override for every layout")
    ap.add_argument("--layout-config", action="append", default=[],
                    help="LAYOUT=BLOCK_N,WARPS,STAGES[,X_MODE]: override for one layout")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="comma list of page storages timed in the same run: auto (the "
                         "bf16 pages), fp8 / fp8_e4m3 (default auto)")
    ap.add_argument("--kv-cache-scale", default="per-token-head",
                    choices=["per-token-head", "per-tensor"],
                    help="FP8 scales (default per-token-head)")
    ap.add_argument("--json-out", default=None, help="write the run (device, peers, rows) here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random q/K/V")
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.num_kv_heads < 1 or args.num_q_heads % args.num_kv_heads:
        ap.error(f"--num-q-heads {args.num_q_heads} is not a multiple of --num-kv-heads "
                 f"{args.num_kv_heads}")
    return args


def run_shape(args: argparse.Namespace, shape: Shape, ceilings: DeviceCeilings,
              gen: torch.Generator, failures: list[str]) -> list[BenchRow]:
    device = torch.device(args.device)
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
    p = make_problem(shape, args.num_q_heads, args.num_kv_heads, args.head_dim, device, gen)
    common = dict(op="decode", batch=shape.batch, context=shape.context, new_tokens=1,
                  nbytes=p.nbytes, flops=p.flops, ceilings=ceilings)
    rows: list[BenchRow] = []
    peers = [s for s in args.peers.split(",") if s]
    sdpa_us = None
    if "sdpa" in peers:
        fn, how = sdpa_flash_fn(p)
        sdpa_us = time_graph_us(fn)
        rows.append(make_row(backend="sdpa_flash", layout="contiguous", page_size=0,
                             variant="softmax", time_us=sdpa_us, extra={"gqa": how}, **common))
    if "flex" in peers:
        try:
            us = time_graph_us(flex_fn(p))
            rows.append(make_row(backend="flex", layout="contiguous", page_size=0,
                                 variant="softmax", time_us=us, **common))
        except Exception as exc:  # noqa: BLE001 - a peer failing must not end the run
            logger.warning("FlexAttention failed on %s: %s", shape, exc)
    per_layout = dict(spec.split("=", 1) for spec in args.layout_config)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]
    variant_shapes = {Shape.parse(s) for s in args.variant_shapes.split(",") if s}
    variant_layouts = set(args.variant_layouts.split(","))
    refs: dict[tuple[str, str], torch.Tensor] = {}
    softmax_us: dict[tuple[str, int, str], float] = {}
    bf16_us: dict[tuple[str, int, str], float] = {}
    kv_dtypes = parse_kv_cache_dtypes(args.kv_cache_dtype, args.kv_cache_scale, p.q.dtype)
    for layout, page_size, kv_dtype in _cells(args, kv_dtypes):
        paged = build_paged_kv(p.k, p.v, [shape.context] * shape.batch, layout, page_size,
                               generator=gen, kv_dtype=kv_dtype)
        kv_name = paged.kv_dtype_name
        nbytes = p.paged_nbytes(paged)
        text = per_layout.get(layout, args.config)
        config = (DecodeConfig(*(int(x) for x in text.split(","))) if text else
                  default_decode_config(paged.layout, p.head_dim, device.type == "cuda"))
        for variant in variants:
            if variant.name != "softmax" and (
                layout not in variant_layouts
                or (variant_shapes and shape not in variant_shapes)
            ):
                continue
            run = triton_run(p, paged, variant, num_sms, config, args.splits)
            us = time_graph_us(run.fn)
            extra: dict[str, Any] = {"splits": run.splits, "config": config_label(config)}
            if sdpa_us is not None:
                extra["vs_sdpa"] = round(sdpa_us / us, 3)
            key = (layout, page_size, str(variant))
            if not kv_dtype.is_fp8:
                bf16_us[key] = us
            elif key in bf16_us:
                extra["vs_bf16"] = round(bf16_us[key] / us, 3)
            if variant.name == "softmax":
                softmax_us[(layout, page_size, kv_name)] = us
            elif (layout, page_size, kv_name) in softmax_us:
                extra["vs_softmax"] = round(us / softmax_us[(layout, page_size, kv_name)], 3)
            if args.check:
                run.out.fill_(float("nan"))
                run.fn()
                ref_key = (str(variant), kv_name)
                if ref_key not in refs:  # FP8: the reference reads the dequantized K/V
                    refs[ref_key] = reference_out(_dequantized_problem(p, kv_dtype), variant)
                err = rel_err(run.out, refs[ref_key])
                extra["rel_err"] = float(f"{err:.2e}")
                if not err < 1e-2:
                    failures.append(f"{shape} {layout} P={page_size} {variant}: err {err}")
            rows.append(make_row(backend="triton", layout=layout, page_size=page_size,
                                 variant=str(variant), time_us=us, extra=extra,
                                 kv_cache_dtype=kv_name, **dict(common, nbytes=nbytes)))
        del paged
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench attention --op decode needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ceilings = measure_ceilings(device)
    read_gbps = measure_read_gbps(device)
    print(f"copy {ceilings.copy_gbps:.0f} GB/s, streaming read {read_gbps:.0f} GB/s "
          f"({read_gbps / ceilings.copy_gbps:.3f}x copy), bf16 matmul "
          f"{ceilings.matmul_tflops:.0f} TFLOP/s")
    rows: list[BenchRow] = []
    failures: list[str] = []
    checks: list[dict[str, Any]] = []
    if args.check:
        for layout in args.layouts.split(","):
            for page_size in ([1] if layout == "token" else
                              [int(x) for x in args.page_sizes.split(",")]):
                checks += ragged_checks(layout, page_size, device, gen)
        failures += [f"ragged check {c}" for c in checks if not c["ok"]]
        print(f"ragged checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok, max rel err "
              f"{max(c['rel_err'] for c in checks):.2e}", flush=True)
    for text in args.shapes.split(","):
        shape_rows = run_shape(args, Shape.parse(text), ceilings, gen, failures)
        print(format_table(shape_rows), flush=True)
        rows += shape_rows
    if args.json_out:
        write_json(args.json_out, dict(device_record(ceilings, rows), read_gbps=round(read_gbps, 1),
                                       checks=checks))
    for f in failures:
        print("CHECK FAILED:", f)
    return 1 if failures else 0
