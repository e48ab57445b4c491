"""Shared pieces of the kernel benchmarks (`attnserve bench attention ...`).

- device ceilings measured in the same run: device-to-device copy bandwidth (bytes read +
  bytes written) and a large bf16 matrix product;
- CUDA-event timing with warm-up and medians;
- the JSON record: `device`, `torch`, `triton`, `date`, `copy_gbps`, `matmul_tflops`, `rows`,
  each row with `op`, `backend`, `layout`, `page_size`, `variant`, `batch`, `context`,
  `new_tokens`, `time_us`, `gbps`, `tflops`, `roofline_fraction` (plus free-form `extra`);
- paged K/V of the same content in every layout, built from contiguous K/V, with shuffled
  page ids so that no kernel profits from pages that happen to be adjacent.
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvcache.kv_dtype import KVCacheDtype, dequantize_rows, quantize_rows
from kvcache.layout import KVLayout
from kvcache.pool import SCRATCH_PAGE, write_scales, write_slots

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- timing


def time_cuda_us(
    fn: Callable[[], Any], warmup: int = 5, iters: int = 30, min_warmup_ms: float = 20.0
) -> float:
    """Median time of `fn()` in microseconds, each call bracketed by CUDA events.

    Warm-up runs at least `warmup` calls and at least `min_warmup_ms` of device time, so
    compilation, autotuning and clock ramp-up stay out of the numbers.
    """
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    done = 0
    while True:
        fn()
        done += 1
        if done >= warmup:
            end.record()
            end.synchronize()
            if start.elapsed_time(end) >= min_warmup_ms:
                break
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


# ----------------------------------------------------------------------------- ceilings


@dataclass(frozen=True)
class DeviceCeilings:
    copy_gbps: float  # device-to-device copy, bytes read + written, per second / 1e9
    matmul_tflops: float  # bf16 matmul


def measure_copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_us = time_cuda_us(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * nbytes / (t_us * 1e-6) / 1e9


def measure_matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_us = time_cuda_us(lambda: a @ b, warmup=3, iters=20)
    return 2 * n**3 / (t_us * 1e-6) / 1e12


def measure_ceilings(device: torch.device) -> DeviceCeilings:
    ceilings = DeviceCeilings(measure_copy_gbps(device), measure_matmul_tflops(device))
    logger.info("ceilings: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s",
                ceilings.copy_gbps, ceilings.matmul_tflops)
    return ceilings


# ----------------------------------------------------------------------------- records


@dataclass
class BenchRow:
    op: str  # "decode", "prefill", "extend"
    backend: str  # "triton", "sdpa_flash", "flex", ...
    layout: str  # KV layout, or "contiguous" for peers on unpaged K/V
    page_size: int
    variant: str
    batch: int
    context: int  # KV tokens per sequence (cached + new)
    new_tokens: int  # query tokens per sequence
    time_us: float
    gbps: float
    tflops: float
    roofline_fraction: float
    extra: dict[str, Any] = field(default_factory=dict)
    kv_cache_dtype: str = "auto"  # the pages' storage: auto (q's dtype) or fp8_e4m3


def make_row(
    *,
    op: str,
    backend: str,
    layout: str,
    page_size: int,
    variant: str,
    batch: int,
    context: int,
    new_tokens: int,
    time_us: float,
    nbytes: float,
    flops: float,
    ceilings: DeviceCeilings,
    extra: dict[str, Any] | None = None,
    kv_cache_dtype: str = "auto",
) -> BenchRow:
    """A row whose roofline fraction is floor time / measured time, where the floor is the
    larger of bytes / copy bandwidth and flops / matmul rate."""
    seconds = time_us * 1e-6
    floor = max(nbytes / (ceilings.copy_gbps * 1e9), flops / (ceilings.matmul_tflops * 1e12))
    return BenchRow(
        op=op, backend=backend, layout=layout, page_size=page_size, variant=variant,
        batch=batch, context=context, new_tokens=new_tokens, time_us=round(time_us, 2),
        gbps=round(nbytes / seconds / 1e9, 1), tflops=round(flops / seconds / 1e12, 2),
        roofline_fraction=round(floor / seconds, 4), extra=extra or {},
        kv_cache_dtype=kv_cache_dtype,
    )


def device_record(ceilings: DeviceCeilings, rows: list[BenchRow]) -> dict[str, Any]:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_gbps": round(ceilings.copy_gbps, 1),
        "matmul_tflops": round(ceilings.matmul_tflops, 1),
        "rows": [asdict(r) for r in rows],
    }


def write_json(path: str, record: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    logger.info("wrote %s (%d rows)", path, len(record["rows"]))


def format_table(rows: list[BenchRow], baseline: dict[tuple, float] | None = None) -> str:
    """A fixed-width table of rows (for the CLI's output)."""
    head = (f"{'op':7} {'backend':11} {'layout':10} {'P':>3} {'kv':8} {'variant':14} {'batch':>5} "
            f"{'ctx':>6} {'new':>5} {'time_us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'roof':>6}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.op:7} {r.backend:11} {r.layout:10} {r.page_size:>3} {r.kv_cache_dtype:8} "
            f"{r.variant:14} "
            f"{r.batch:>5} {r.context:>6} {r.new_tokens:>5} {r.time_us:>9.1f} {r.gbps:>7.0f} "
            f"{r.tflops:>8.1f} {r.roofline_fraction:>6.3f}"
            + "".join(f" {k}={v}" for k, v in r.extra.items())
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- paged K/V


@dataclass
class PagedKV:
    """One layer's K and V in a paged layout, holding the same content as contiguous K/V."""

    layout: KVLayout
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, pages_per_seq] int32, shuffled page ids (never page 0)
    seq_lens: torch.Tensor  # [B] int32
    # FP8 pages: per-(token, head) scales [pages, kv_heads, page_size] (None: scale 1.0)
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None

    @property
    def kv_dtype_name(self) -> str:
        return "fp8_e4m3" if self.k_cache.dtype == torch.float8_e4m3fn else "auto"

    @property
    def scales(self) -> dict[str, torch.Tensor | None]:
        """The kernels' scale arguments."""
        return {"k_scales": self.k_scales, "v_scales": self.v_scales}

    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V as stored: codes or elements, and scales."""
        row = self.layout.head_dim * self.k_cache.element_size()
        if self.k_scales is not None:
            row += self.k_scales.element_size()
        return 2 * self.layout.num_kv_heads * row


def build_paged_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    layout_name: str,
    page_size: int,
    generator: torch.Generator | None = None,
    spare_pages: int = 0,
    kv_dtype: KVCacheDtype | None = None,
) -> PagedKV:
    """Scatter contiguous K/V [B, L, Hkv, D] (sequence b holds seq_lens[b] <= L tokens) into
    a fresh paged cache of `layout_name`, pages in shuffled order; page 0 stays scratch.
    With an FP8 `kv_dtype` the rows are quantized as the store kernel does (and their
    scales kept beside the pages)."""
    B, L, H, D = k.shape
    kv_dtype = kv_dtype or KVCacheDtype(k.dtype)
    layout = KVLayout.create(layout_name, page_size, H, D, kv_dtype.storage_name)
    P = layout.page_size
    pages_per_seq = -(-L // P)
    num_pages = B * pages_per_seq + 1 + spare_pages
    device = k.device
    perm_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(num_pages - 1, generator=generator, device=perm_device).to(device) + 1
    block_table = perm[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    assert not bool((block_table == SCRATCH_PAGE).any())
    shape = layout.cache_shape(num_pages)
    k_cache = torch.zeros(shape, dtype=kv_dtype.dtype, device=device)
    v_cache = torch.zeros(shape, dtype=kv_dtype.dtype, device=device)
    scales = [torch.ones(layout.scale_shape(num_pages), device=device)
              if kv_dtype.has_scales else None for _ in range(2)]
    for b in range(B):
        n = seq_lens[b]
        pos = torch.arange(n, device=device)
        slots = block_table[b, pos // P].long() * P + pos % P
        for cache, scale, rows in ((k_cache, scales[0], k[b, :n]), (v_cache, scales[1], v[b, :n])):
            if not kv_dtype.is_fp8:
                write_slots(cache, layout, slots, rows)
                continue
            assert kv_dtype.scale_mode is not None
            codes, row_scales = quantize_rows(rows, kv_dtype.scale_mode)
            write_slots(cache, layout, slots, codes)
            if scale is not None and row_scales is not None:
                write_scales(scale, layout, slots, row_scales)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return PagedKV(layout, k_cache, v_cache, block_table, lens, scales[0], scales[1])


def dequantized(rows: torch.Tensor, kv_dtype: KVCacheDtype) -> torch.Tensor:
    """What an FP8 cache gives back for `rows` [..., D] (rows themselves when not FP8), in
    float32: the input of a reference that measures only the kernel's error."""
    if not kv_dtype.is_fp8:
        return rows
    assert kv_dtype.scale_mode is not None
    codes, scales = quantize_rows(rows, kv_dtype.scale_mode)
    return dequantize_rows(codes, scales, torch.float32)


def parse_kv_cache_dtypes(text: str, scale_mode: str,
                          model_dtype: torch.dtype) -> list[KVCacheDtype]:
    """--kv-cache-dtype: a comma list of auto/fp8/fp8_e4m3, each resolved."""
    return [KVCacheDtype.from_flags(name, scale_mode, model_dtype)
            for name in text.split(",") if name]


def time_graph_us(fn: Callable[[], Any], calls_per_graph: int = 10, replays: int = 15) -> float:
    """Median time of one `fn()` call, captured `calls_per_graph` times in a CUDA graph and
    replayed, so host launch latency (large next to a 50 us kernel) stays out. Falls back
    to plain event timing when `fn` cannot be captured."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                fn()
    except RuntimeError as exc:
        logger.warning("graph capture failed (%s); timing plain launches", exc)
        torch.cuda.synchronize()
        return time_cuda_us(fn)
    return time_cuda_us(graph.replay, warmup=3, iters=replays) / calls_per_graph
