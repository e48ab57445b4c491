"""`attnserve bench attention --op prefill|extend`: the Triton extend kernel vs its peers.

For each case (causal prefill of batch x length, or extend: new tokens over a cached
prefix) and each KV layout, the paged Triton kernel is timed (optionally over a sweep of
block configs, the best one reported), checked in bf16 against an fp32 reference on a
subset of heads (relative error < 1e-2, every output element written), and compared with
torch SDPA-flash, cuDNN attention and FlexAttention on contiguous K/V of the same content,
all in the same run, next to the measured bf16 matmul rate and copy bandwidth. Causal
FLOPs count the visible (query, key) pairs: half the square for a prefill.
With `--kv-cache-dtype auto,fp8` every layout is timed on bf16 and on FP8 pages (quantized
as the store kernel does; checked against the reference on the dequantized K/V) in the
same run; FP8 rows carry `vs_bf16`, the bf16 kernel's time over theirs. FP8 calls run the
portable Triton kernel (the Gluon sm90 kernel takes one dtype throughout).

Rows go to a JSON file in the format of bench/attention/common.py (peers are rows with
their own `backend` and layout "contiguous"); the JSON is rewritten after every case so a
run cut short still leaves its numbers. The summary table is printed last.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attention.triton.extend import default_config, extend_attention_with_config, kernel_name
from attention.triton.extend_config import ExtendConfig, layout_kind
from attention.variants import Variant
from bench.attention.common import (
    BenchRow,
    DeviceCeilings,
    PagedKV,
    build_paged_kv,
    dequantized,
    device_record,
    make_row,
    measure_ceilings,
    parse_kv_cache_dtypes,
    time_cuda_us,
    write_json,
)
from bench.attention.prefill_checks import check_head_dim_64, check_variants
from bench.attention.prefill_peers import (
    PEERS,
    PeerUnavailable,
    check_heads,
    reference_rel_error,
)

logger = logging.getLogger(__name__)

_C = ExtendConfig
SWEEPS = {  # layout kind -> configs timed besides the table's choice
    "paged": (
        _C(128, 64, 4, 3, tma=True, tma_diag=True, hopper=True),
        _C(128, 64, 4, 3, tma=True, tma_diag=True), _C(128, 64, 4, 3, tma=True),
        _C(128, 64, 4, 4, tma=True, tma_diag=True), _C(128, 64, 4, 2, tma=True, tma_diag=True),
        _C(128, 64, 4, 3),
    ),
    "token": (_C(128, 64, 4, 3), _C(128, 64, 4, 4)),
    "hnd_x": (_C(128, 64, 4, 3), _C(64, 64, 4, 3)),
}
TOL = 1e-2


@dataclass(frozen=True)
class Case:
    op: str  # "prefill" or "extend"
    batch: int
    new_tokens: int
    prefix: int

    @property
    def context(self) -> int:
        return self.prefix + self.new_tokens

    def causal_flops(self, num_q_heads: int, head_dim: int) -> float:
        """4 * D * Hq * visible pairs; a query at position p sees p + 1 keys."""
        n, p = self.new_tokens, self.prefix
        pairs = n * p + n * (n + 1) / 2
        if self.op == "prefill":
            pairs = n * n / 2  # the convention: half the full square
        return 4.0 * head_dim * num_q_heads * self.batch * pairs

    def nbytes(self, hq: int, hkv: int, d: int, kv_bytes_per_token: int | None = None) -> float:
        """q read and out written (2-byte elements), K/V read once: 2-byte elements, or
        `kv_bytes_per_token` as stored (FP8 codes and scales)."""
        kv = 2 * 2 * hkv * d if kv_bytes_per_token is None else kv_bytes_per_token
        return self.batch * (2.0 * 2 * self.new_tokens * hq * d + self.context * kv)

    def label(self) -> str:
        if self.op == "prefill":
            return f"prefill {self.batch}x{self.new_tokens}"
        return f"extend {self.batch}x({self.prefix}+{self.new_tokens})"


PREFILL_CASES = (
    Case("prefill", 8, 2048, 0), Case("prefill", 2, 8192, 0), Case("prefill", 1, 16384, 0)
)
EXTEND_CASES = (Case("extend", 8, 512, 4096),)
LAYOUT_SPECS = (("nhd", 64), ("hnd", 64), ("token", 1), ("hnd_x", 64))
TARGETS = {  # (op, layout) -> (min ratio to sdpa_flash, min ratio to cudnn), from issue 7 d
    ("prefill", "nhd"): (1.25, 0.85),
    ("prefill", "hnd"): (1.25, 0.85),
    ("prefill", "token"): (1.0, None),
    ("extend", "nhd"): (1.1, None),
    ("extend", "hnd"): (1.1, None),
    ("extend", "token"): (1.1, None),
}


def paged_launcher(
    case: Case, q4: torch.Tensor, paged: PagedKV, variant: Variant
) -> tuple[Callable[[ExtendConfig], object], torch.Tensor]:
    """A launch of the extend kernel for `case` over paged K/V (one config per call), and
    the output it writes: q4 is [B, new_tokens, Hq, D], each sequence `case.context` long."""
    B, Lq, hq, d = q4.shape
    dev = q4.device
    q = q4.reshape(B * Lq, hq, d)
    qo_indptr = torch.arange(0, B * Lq + 1, Lq, dtype=torch.int32, device=dev)
    prefix_lens = torch.full((B,), case.prefix, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)

    def launch(cfg: ExtendConfig) -> object:
        return extend_attention_with_config(
            q, paged.k_cache, paged.v_cache, paged.layout, qo_indptr, prefix_lens,
            paged.seq_lens, paged.block_table, out, d**-0.5, variant, Lq, None, cfg,
            **paged.scales,
        )

    return launch, out


def launch_error(
    launch: Callable[[ExtendConfig], object], out: torch.Tensor, cfg: ExtendConfig,
    q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor,
) -> float:
    """One launch of `cfg` into a NaN-filled output, checked against the fp32 reference on
    `check_heads`: the relative error, or NaN when an element is unwritten or not finite."""
    B, Lq, hq, d = q4.shape
    out.fill_(float("nan"))
    launch(cfg)
    err = reference_rel_error(
        q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2),
        out.view(B, Lq, hq, d).transpose(1, 2), d**-0.5, check_heads(hq, k4.shape[2]),
    )
    return err if bool(torch.isfinite(out).all()) else float("nan")


def _triton_rows(case, args, ceilings, q4, k4, v4, gen, layout_specs) -> list[BenchRow]:
    B, Lq = case.batch, case.new_tokens
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    dev = q4.device
    variant = Variant("softmax")
    rows = []
    kv_dtypes = parse_kv_cache_dtypes(args.kv_cache_dtype, args.kv_cache_scale, q4.dtype)
    for (layout_name, page_size), kv_dtype in [(spec, kv) for spec in layout_specs
                                               for kv in kv_dtypes]:
        paged = build_paged_kv(k4, v4, [case.context] * B, layout_name, page_size, gen,
                               kv_dtype=kv_dtype)
        # the reference reads what the pages give back (FP8: dequantized)
        k_ref, v_ref = dequantized(k4, kv_dtype), dequantized(v4, kv_dtype)
        launch, out = paged_launcher(case, q4, paged, variant)
        q = q4.reshape(B * Lq, hq, d)
        default = default_config(d, dev, layout_name)
        sweep = SWEEPS[args.sweep_set or layout_kind(layout_name)]
        configs = [default] + [c for c in sweep if c != default] if args.sweep else [default]
        timings, errors = {}, {}
        for cfg in configs:
            try:
                timings[cfg] = time_cuda_us(lambda cfg=cfg, launch=launch: launch(cfg),
                                            iters=args.iters)
            except Exception as exc:  # a config may not fit shared memory on this device
                logger.warning("config %s failed on %s: %s", cfg, layout_name, exc)
                continue
            errors[cfg] = launch_error(launch, out, cfg, q4, k_ref, v_ref)
        if not timings:
            continue
        checked = {c: t for c, t in timings.items() if errors[c] < TOL}
        best = min(checked or timings, key=timings.get)
        flops = case.causal_flops(hq, d)
        for cfg in {default, best} & set(timings):
            err = errors[cfg]
            ok = err < TOL  # False for NaN (an unwritten or NaN output)
            if not ok:
                logger.error("triton %s %s %s: rel err %.2e", case.label(), layout_name, cfg, err)
            extra = {"config": str(cfg), "default": cfg == default, "rel_err": f"{err:.1e}",
                     "kernel": kernel_name(cfg, q, paged.layout, variant, paged.block_table),
                     "check": "ok" if ok else "FAIL",
                     "sweep": {str(c): [round(t, 1), f"{errors[c]:.1e}"]
                               for c, t in timings.items()}}
            rows.append(make_row(
                op=case.op, backend="triton", layout=layout_name, page_size=page_size,
                variant="softmax", batch=B, context=case.context, new_tokens=Lq,
                time_us=timings[cfg], nbytes=case.nbytes(hq, hkv, d, paged.kv_bytes_per_token()),
                flops=flops, ceilings=ceilings, extra=extra, kv_cache_dtype=paged.kv_dtype_name,
            ))
        del paged, out, k_ref, v_ref
    return rows


def _peer_rows(case, args, ceilings, q4, k4, v4) -> list[BenchRow]:
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    scale = d**-0.5
    qc = q4.transpose(1, 2).contiguous()
    kc = k4.transpose(1, 2).contiguous()
    vc = v4.transpose(1, 2).contiguous()
    rows = []
    for name in args.peers:
        t0 = time.monotonic()
        try:
            run, extra = PEERS[name](qc, kc, vc, scale)
        except PeerUnavailable as exc:
            logger.warning("peer %s unavailable for %s: %s", name, case.label(), exc)
            continue
        err = reference_rel_error(qc, kc, vc, run(), scale, check_heads(hq, hkv))
        extra = dict(extra, rel_err=f"{err:.1e}", setup_s=round(time.monotonic() - t0, 1))
        rows.append(make_row(
            op=case.op, backend=name, layout="contiguous", page_size=0, variant="softmax",
            batch=case.batch, context=case.context, new_tokens=case.new_tokens,
            time_us=time_cuda_us(run, iters=args.iters), nbytes=case.nbytes(hq, hkv, d),
            flops=case.causal_flops(hq, d), ceilings=ceilings, extra=extra,
        ))
    return rows


def _add_ratios(rows: list[BenchRow]) -> None:
    """Each triton row gets its speed-up over every peer of the same case; an FP8 row also
    `vs_bf16`, the bf16 pages' time (same layout, page size and default-ness) over its."""
    for r in rows:
        if r.backend != "triton":
            continue
        if r.kv_cache_dtype != "auto":
            for b in rows:
                if (b.backend == "triton" and b.kv_cache_dtype == "auto"
                        and (b.op, b.batch, b.context, b.new_tokens, b.layout, b.page_size)
                        == (r.op, r.batch, r.context, r.new_tokens, r.layout, r.page_size)
                        and b.extra.get("default") == r.extra.get("default")):
                    r.extra["vs_bf16"] = round(b.time_us / r.time_us, 3)
        for p in rows:
            same = (p.op, p.batch, p.context, p.new_tokens) == (r.op, r.batch, r.context,
                                                                 r.new_tokens)
            if p.layout == "contiguous" and same:
                r.extra[f"vs_{p.backend}"] = round(p.time_us / r.time_us, 3)
        flash_min, cudnn_min = TARGETS.get((r.op, r.layout), (None, None))
        met = []
        if flash_min is not None and "vs_sdpa_flash" in r.extra:
            met.append(r.extra["vs_sdpa_flash"] >= flash_min)
        if cudnn_min is not None and "vs_cudnn" in r.extra:
            met.append(r.extra["vs_cudnn"] >= cudnn_min)
        if met:
            r.extra["target"] = "met" if all(met) else "MISSED"


def summary_table(rows: list[BenchRow], ceilings: DeviceCeilings) -> str:
    lines = [f"bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s, "
             f"copy {ceilings.copy_gbps:.0f} GB/s",
             f"{'case':26} {'backend':10} {'layout':10} {'kv':8} {'TFLOP/s':>8} {'x bf16':>7} "
             f"{'x flash':>8} "
             f"{'x cudnn':>8} {'x flex':>7} {'kernel':12} {'err':>8} target"]
    for r in rows:
        if r.backend == "triton" and not r.extra.get("default") and r.extra.get("config"):
            label = "best"
        else:
            label = ""
        case = Case(r.op, r.batch, r.new_tokens, r.context - r.new_tokens).label()
        e = r.extra
        lines.append(
            f"{case:26} {r.backend:10} {r.layout:10} {r.kv_cache_dtype:8} {r.tflops:>8.1f} "
            f"{e.get('vs_bf16', ''):>7} "
            f"{e.get('vs_sdpa_flash', ''):>8} {e.get('vs_cudnn', ''):>8} {e.get('vs_flex', ''):>7} "
            f"{e.get('kernel', e.get('config', '')) + (' ' + label if label else ''):12} "
            f"{e.get('rel_err', ''):>8} "
            f"{e.get('target', '')}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=["prefill", "extend", "all"], default="all",
                        help="causal prefill cases, the extend case, or both (default all)")
    parser.add_argument("--layouts", default="nhd:64,hnd:64,token:1,hnd_x:64",
                        help="comma list of layout:page_size")
    parser.add_argument("--num-q-heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--num-kv-heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--peers", default="sdpa_flash,cudnn,flex",
                        help="comma-separated peers on contiguous K/V: sdpa_flash, cudnn, flex")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="time only the table config of the kernel")
    parser.add_argument("--sweep-set", choices=sorted(SWEEPS), default=None,
                        help="time this config set for every layout (default: by layout kind)")
    parser.add_argument("--no-checks", dest="checks", action="store_false",
                        help="skip the variant and head-dim-64 checks")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="q/K/V dtype (default bfloat16)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="comma list of page storages timed in the same run: auto (pages "
                             "in --dtype), fp8 / fp8_e4m3 (default auto)")
    parser.add_argument("--kv-cache-scale", default="per-token-head",
                        choices=["per-token-head", "per-tensor"],
                        help="FP8 scales (default per-token-head)")
    parser.add_argument("--iters", type=int, default=30, help="timed repetitions per case")
    parser.add_argument("--out", "--json-out", dest="out", default="prefill.json",
                        help="JSON output path (default prefill.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q/K/V")


def run(args: argparse.Namespace) -> list[BenchRow]:
    if args.num_kv_heads < 1 or args.num_q_heads % args.num_kv_heads:
        raise SystemExit(f"--num-q-heads {args.num_q_heads} is not a multiple of "
                         f"--num-kv-heads {args.num_kv_heads}")
    if not torch.cuda.is_available():
        raise SystemExit("the prefill/extend benchmark needs a CUDA device")
    if isinstance(args.peers, str):
        args.peers = [p for p in args.peers.split(",") if p]
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    torch.manual_seed(args.seed)
    ceilings = measure_ceilings(dev)
    layout_specs = [(s.split(":")[0], int(s.split(":")[1])) for s in args.layouts.split(",")]
    cases = {"prefill": PREFILL_CASES, "extend": EXTEND_CASES,
             "all": PREFILL_CASES + EXTEND_CASES}[args.op]
    rows: list[BenchRow] = []
    record_extra = {}
    if args.checks:
        record_extra["checks"] = check_variants(dev) + check_head_dim_64(dev)
        for c in record_extra["checks"]:
            logger.info("check %s", c)
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    for case in cases:
        t0 = time.monotonic()
        B = case.batch
        dtype = getattr(torch, args.dtype)
        q4 = torch.randn(B, case.new_tokens, hq, d, device=dev, dtype=dtype)
        k4 = torch.randn(B, case.context, hkv, d, device=dev, dtype=dtype)
        v4 = torch.randn(B, case.context, hkv, d, device=dev, dtype=dtype)
        case_rows = _triton_rows(case, args, ceilings, q4, k4, v4, gen, layout_specs)
        case_rows += _peer_rows(case, args, ceilings, q4, k4, v4)
        _add_ratios(case_rows)
        rows += case_rows
        logger.info("%s done in %.0f s", case.label(), time.monotonic() - t0)
        record = device_record(ceilings, rows)
        record.update(record_extra)
        write_json(args.out, record)
    print(summary_table(rows, ceilings))
    if "checks" in record_extra:
        bad = [c for c in record_extra["checks"] if not c["ok"]]
        print(f"variant/head-dim checks: {len(record_extra['checks']) - len(bad)} ok, "
              f"{len(bad)} failed {bad}")
    return rows


def main(args: argparse.Namespace | list[str] | None = None) -> None:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="attnserve bench attention --op prefill|extend",
                                         description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(args)


if __name__ == "__main__":
    main()
