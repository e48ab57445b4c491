"""The Triton decode and extend kernels on FP8 pages, under the CPU interpreter, against the
float64 oracle run on the same dequantized pages (so only the kernels' error is measured).

Every layout x page size (hnd_x has x = 16 one-byte elements) x variant, with per-(token,
head) scales, and the per-tensor scale of 1.0; decode with one and three KV splits. Rows
span six orders of magnitude, which per-row scales are for. Codes nobody owns are NaN
(0x7F), and so are their scales.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.backends.reference import ReferenceBackend  # noqa: E402
from attention.backends.triton_backend import TritonBackend  # noqa: E402
from attention.base import AttentionConfig, RopeInputs  # noqa: E402
from attention.batch import ForwardBatch  # noqa: E402
from attention.triton.decode import DecodeConfig, SplitBuffers, decode_attention  # noqa: E402
from attention.triton.extend import extend_attention  # noqa: E402
from attention.triton.variants import triton_variant  # noqa: E402
from attention.variants import Variant, alibi_slopes  # noqa: E402
from kvcache.kv_dtype import (  # noqa: E402
    PER_TENSOR,
    PER_TOKEN_HEAD,
    KVCacheDtype,
    dequantize_rows,
    quantize_rows,
)
from kvcache.layout import KVLayout  # noqa: E402
from kvcache.pool import KVPool, KVPoolConfig, write_scales, write_slots  # noqa: E402
from tests.attention.attention_oracle import oracle_attention  # noqa: E402

FP8 = torch.float8_e4m3fn
NUM_KV_HEADS = 2
HEAD_DIM = 16
LAYOUT_PAGES = [("token", 1), ("nhd", 4), ("nhd", 16), ("hnd", 4), ("hnd", 16),
                ("hnd_x", 16), ("hnd_x", 32)]
VARIANTS = [Variant("softmax"), Variant("softcap", 2.0), Variant("sliding_window", 7.0),
            Variant("alibi"), Variant("sigmoid"), Variant("silu")]


class Fp8Pages:
    """Sequences' K/V quantized into NaN-poisoned FP8 pages at shuffled page ids, and the
    dequantized float64 rows the oracle reads."""

    def __init__(self, layout: KVLayout, seq_lens: list[int], scale_mode: str,
                 gen: torch.Generator) -> None:
        P = layout.page_size
        need = [-(-n // P) for n in seq_lens]
        num_pages = sum(need) + 3  # + scratch page 0 + pages nobody owns
        ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
        shape = layout.cache_shape(num_pages)
        self.k_cache = torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)
        self.v_cache = torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)
        with_scales = scale_mode == PER_TOKEN_HEAD
        self.k_scales = torch.full(layout.scale_shape(num_pages), float("nan")) if with_scales \
            else None
        self.v_scales = torch.full_like(self.k_scales, float("nan")) if with_scales else None
        self.table = torch.zeros(len(seq_lens), max(need) + 2, dtype=torch.int32)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for b, n in enumerate(seq_lens):
            pages = torch.tensor([ids.pop() for _ in range(need[b])], dtype=torch.int32)
            self.table[b, : need[b]] = pages
            slots = pages.long()[torch.arange(n) // P] * P + torch.arange(n) % P
            mags = torch.logspace(-3, 3, n)[torch.randperm(n, generator=gen)][:, None, None]
            for cache, scales, rows in ((self.k_cache, self.k_scales, self.k),
                                        (self.v_cache, self.v_scales, self.v)):
                x = torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) * mags
                codes, row_scales = quantize_rows(x, scale_mode)
                write_slots(cache, layout, slots, codes)
                if scales is not None:
                    write_scales(scales, layout, slots, row_scales)
                rows.append(dequantize_rows(codes, row_scales, torch.float64))

    @property
    def scales(self) -> dict[str, torch.Tensor | None]:
        return {"k_scales": self.k_scales, "v_scales": self.v_scales}


def _layout(name: str, page_size: int) -> KVLayout:
    return KVLayout.create(name, page_size, NUM_KV_HEADS, HEAD_DIM, "float8_e4m3fn")


def _runs(scale_mode: str) -> list[tuple[Variant, int]]:
    """(variant, splits): every variant split three ways with scales, and softmax in one
    split; per-tensor with softmax."""
    if scale_mode == PER_TENSOR:
        return [(Variant("softmax"), 3)]
    return [(variant, 3) for variant in VARIANTS] + [(Variant("softmax"), 1)]


def _rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.double() - want).norm() / want.norm())


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_fp8_decode_matches_float64_on_dequantized_pages(layout_name: str, page_size: int,
                                                          scale_mode: str) -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    layout = _layout(layout_name, page_size)
    seq_lens = [37, 5, 22]
    group = 3 if page_size == 4 else 2
    Hq = NUM_KV_HEADS * group
    pages = Fp8Pages(layout, seq_lens, scale_mode, gen)
    q = torch.randn(len(seq_lens), Hq, HEAD_DIM, generator=gen) * 0.05
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    slopes = alibi_slopes(Hq).float()
    scale = HEAD_DIM**-0.5
    buffers = SplitBuffers.empty(q.device)
    for variant, splits in _runs(scale_mode):
        want = torch.cat([
            oracle_attention(q[b : b + 1], pages.k[b], pages.v[b], n - 1, scale, variant.name,
                             variant.param)
            for b, n in enumerate(seq_lens)])
        out = torch.full_like(q, float("nan"))
        decode_attention(q, pages.k_cache, pages.v_cache, layout, pages.table, lens, out, scale,
                         triton_variant(variant), slopes, splits, buffers,
                         DecodeConfig(16, 4, 1), **pages.scales)
        err = _rel_err(out, want)
        assert err < 1e-5, f"{variant} splits={splits}: relative error {err:.2e}"


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_fp8_extend_matches_float64_on_dequantized_pages(layout_name: str, page_size: int,
                                                          scale_mode: str) -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    layout = _layout(layout_name, page_size)
    prefix_lens, q_lens = [0, 11, 30], [21, 9, 1]  # a prompt, an extend, a decode-like row
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens, strict=True)]
    group = 3 if page_size == 4 else 2
    Hq = NUM_KV_HEADS * group
    pages = Fp8Pages(layout, seq_lens, scale_mode, gen)
    q = torch.randn(sum(q_lens), Hq, HEAD_DIM, generator=gen) * 0.05
    indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    for variant in dict.fromkeys(variant for variant, _ in _runs(scale_mode)):
        want = torch.cat([
            oracle_attention(q[indptr[b] : indptr[b + 1]], pages.k[b], pages.v[b], p, scale,
                             variant.name, variant.param)
            for b, p in enumerate(prefix_lens)])
        out = torch.full_like(q, float("nan"))
        extend_attention(q, pages.k_cache, pages.v_cache, layout, indptr,
                         torch.tensor(prefix_lens, dtype=torch.int32),
                         torch.tensor(seq_lens, dtype=torch.int32), pages.table, out, scale,
                         variant, max(q_lens), None, **pages.scales)
        err = _rel_err(out, want)
        assert err < 1e-5, f"{variant}: relative error {err:.2e}"


@pytest.mark.parametrize(("layout_name", "page_size"), [("token", 1), ("hnd", 4), ("hnd_x", 16)])
def test_triton_backend_fp8_step_matches_reference_backend(layout_name: str,
                                                           page_size: int) -> None:
    """The backends' FP8 wiring: two decodes (one split) and a prefill chunk over a cached
    prefix, through plan + forward and plan + forward_rope on FP8 pools with scales, the
    triton backend against the reference backend (which dequantizes, then attends)."""
    gen = torch.Generator().manual_seed(11)
    config = AttentionConfig(NUM_KV_HEADS * 3, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5,
                             Variant("softcap", 3.0))
    prefix, q_lens, num_pages = [29, 6, 9], [1, 1, 5], 48 // page_size + 40
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables = [[ids.pop() for _ in range(-(-(p + n) // page_size))]
              for p, n in zip(prefix, q_lens, strict=True)]
    batch = ForwardBatch.build(q_lens, prefix, tables, page_size, torch.device("cpu"))
    spec = KVCacheDtype(FP8, PER_TOKEN_HEAD)
    layout = _layout(layout_name, page_size)
    pools = [KVPool(KVPoolConfig(layout, 1, num_pages, torch.float32, torch.device("cpu"), spec))
             for _ in range(2)]
    for p, pages in zip(prefix, tables, strict=True):
        pos = torch.arange(p)
        slots = torch.tensor(pages)[pos // page_size] * page_size + pos % page_size
        kv = torch.randn(2, p, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        for pool in pools:
            pool.store(0, kv[0], kv[1], slots)
    T = batch.num_tokens
    q = torch.randn(T, config.num_q_heads, HEAD_DIM, generator=gen)
    k = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    triton_backend, reference = TritonBackend(config, pools[0]), ReferenceBackend(config, pools[1])
    triton_backend.num_sms, triton_backend.min_tokens_per_split = 64, 8  # several splits
    for backend in (triton_backend, reference):
        backend.plan(batch)
    assert triton_backend.num_splits > 1
    got = triton_backend.forward(q, k, v, 0)
    want = reference.forward(q.double(), k.double(), v.double(), 0)
    assert _rel_err(got, want) < 1e-5
    # the stored codes and scales agree too (the store kernel vs the pool's torch path)
    for a, b in zip(pools[0].k_caches + pools[0].k_scales, pools[1].k_caches + pools[1].k_scales,
                    strict=True):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a,
                           b.view(torch.uint8) if b.dtype == FP8 else b)

    positions = batch.positions
    inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).float()

    def rotate_f32(x: torch.Tensor) -> torch.Tensor:  # the kernel's float32 operation order
        half = HEAD_DIM // 2
        c, s = cos_sin[positions, None, :half], cos_sin[positions, None, half:]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    got = triton_backend.forward_rope(q, k, v, RopeInputs(positions, cos_sin), 0)
    want = reference.forward(rotate_f32(q).double(), rotate_f32(k).double(), v.double(), 0)
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("layout_name", "page_size"), [("nhd", 4), ("hnd_x", 16)])
def test_fp8_kernels_with_16bit_q_match_float64(layout_name: str, page_size: int,
                                                scale_mode: str) -> None:
    """16-bit q on FP8 pages: decode (one and three splits) and extend, codes converted to
    q's dtype, against the float64 oracle on the same dequantized pages and the same
    rounded q; the error left is the output's rounding and the 16-bit weights'. An fp16 q:
    the interpreter's bf16 dots are wrong (the GPU's are checked by `bench attention
    --check`), and bf16 takes the same path."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    layout = _layout(layout_name, page_size)
    prefix_lens, q_lens = [0, 30, 17], [21, 9, 1]
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens, strict=True)]
    Hq = NUM_KV_HEADS * 2
    pages = Fp8Pages(layout, seq_lens, scale_mode, gen)
    scale = HEAD_DIM**-0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    variants = [Variant("softmax"), Variant("silu")] if scale_mode == PER_TOKEN_HEAD \
        else [Variant("softmax")]
    q_dec = (torch.randn(len(seq_lens), Hq, HEAD_DIM, generator=gen) * 0.05).half()
    q_ext = (torch.randn(sum(q_lens), Hq, HEAD_DIM, generator=gen) * 0.05).half()
    indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    for variant in variants:
        want = torch.cat([
            oracle_attention(q_dec[b : b + 1].double(), pages.k[b], pages.v[b], n - 1, scale,
                             variant.name, variant.param)
            for b, n in enumerate(seq_lens)])
        for splits in (1, 3):
            out = torch.full_like(q_dec, float("nan"))
            decode_attention(q_dec, pages.k_cache, pages.v_cache, layout, pages.table, lens, out,
                             scale, triton_variant(variant), alibi_slopes(Hq).float(), splits,
                             SplitBuffers.empty(q_dec.device), DecodeConfig(16, 4, 1),
                             **pages.scales)
            err = _rel_err(out, want)
            assert err < 1e-2, f"decode {variant} splits={splits}: relative error {err:.2e}"
        want = torch.cat([
            oracle_attention(q_ext[indptr[b] : indptr[b + 1]].double(), pages.k[b], pages.v[b],
                             p, scale, variant.name, variant.param)
            for b, p in enumerate(prefix_lens)])
        out = torch.full_like(q_ext, float("nan"))
        extend_attention(q_ext, pages.k_cache, pages.v_cache, layout, indptr,
                         torch.tensor(prefix_lens, dtype=torch.int32), lens, pages.table, out,
                         scale, variant, max(q_lens), None, **pages.scales)
        err = _rel_err(out, want)
        assert err < 1e-2, f"extend {variant}: relative error {err:.2e}"
