"""The store kernels' FP8 quantization under the CPU interpreter vs torch, bit for bit.

For every layout x page size, with and without rotary, with per-(token, head) scales and
with the per-tensor scale of 1.0: the e4m3 codes the kernel stores equal torch's
`float8_e4m3fn` conversion of the same float32 rows (kvcache.kv_dtype.quantize_rows), and
so do the scales. Caches and scales start as NaN so a slot written wrongly shows, and every
slot the kernel must not touch is checked to still be NaN. The rounding helper is checked
alone on every tie between two codes, subnormals, signed zeros and saturation.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attention.triton.fp8 import to_e4m3  # noqa: E402
from attention.triton.rope_store import rope_store, store_kv  # noqa: E402
from kvcache.kv_dtype import PER_TENSOR, PER_TOKEN_HEAD, quantize_rows  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402
from kvcache.pool import read_scales, read_slots, write_slots  # noqa: E402

FP8 = torch.float8_e4m3fn
NUM_KV_HEADS = 2
# hnd_x with 1-byte elements has x = 16: pages of 16 and 32
LAYOUT_PAGES = [("token", 1), ("nhd", 4), ("nhd", 16), ("hnd", 4), ("hnd", 16),
                ("hnd_x", 16), ("hnd_x", 32)]


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, to_e4m3(tl.load(x_ptr + offs)))


def test_to_e4m3_rounds_like_torch() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F].view(FP8).float().sort().values
    ties = (finite[1:] + finite[:-1]) / 2  # halfway: to the even code
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([finite, ties, torch.randn(1000, generator=gen) * 200,
                   torch.randn(1000, generator=gen) * 1e-3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 447.9, 464.0, 1e6, -1e6])])
    n = triton.next_power_of_2(x.numel())
    padded = torch.zeros(n)
    padded[: x.numel()] = x
    out = torch.empty(n, dtype=FP8)
    _round_kernel[(1,)](padded, out, N=n)
    want = padded.clamp(-448, 448).to(FP8)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


def _rotate_f32(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The kernel's rotation, in the kernel's float32 operation order."""
    half = x.shape[-1] // 2
    c, s = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _nan_codes(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_store_codes_and_scales_equal_torch(layout_name: str, page_size: int,
                                            dtype: torch.dtype, scale_mode: str) -> None:
    gen = torch.Generator().manual_seed(hash((layout_name, page_size, str(dtype))) % 2**31)
    D, T, group = 32, 13, 3
    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, D, "float8_e4m3fn")
    num_pages = 48 // layout.page_size + 2
    assert layout.x == 16
    total = num_pages * layout.page_size
    slots = torch.randperm(total - layout.page_size, generator=gen)[:T] + layout.page_size
    positions = torch.randint(0, 200, (T,), generator=gen)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(256, dtype=torch.float64)[:, None] * inv[None, :]
    cs = torch.cat([ang.cos(), ang.sin()], -1).float()
    q = torch.randn(T, NUM_KV_HEADS * group, D, generator=gen).to(dtype)
    # rows of very different magnitudes (what per-row scales are for), one all-zero row,
    # and values beyond 448 that per-tensor must saturate
    mags = torch.logspace(-3, 3, T)[torch.randperm(T, generator=gen)][:, None, None]
    k = (torch.randn(T, NUM_KV_HEADS, D, generator=gen) * mags).to(dtype)
    v = (torch.randn(T, NUM_KV_HEADS, D, generator=gen) * mags).to(dtype)
    v[0] = 0
    with_scales = scale_mode == PER_TOKEN_HEAD
    for rotate in (True, False):
        k_cache, v_cache = _nan_codes(layout.cache_shape(num_pages)), _nan_codes(
            layout.cache_shape(num_pages))
        scales = [torch.full(layout.scale_shape(num_pages), float("nan")) for _ in range(2)]
        scale_args = dict(k_scale=scales[0], v_scale=scales[1]) if with_scales else {}
        if rotate:
            rope_store(q, k, v, positions, cs, slots, k_cache, v_cache, layout, **scale_args)
            k_rows = _rotate_f32(k, cs[positions])
        else:
            store_kv(k, v, slots, k_cache, v_cache, layout, **scale_args)
            k_rows = k.float()
        for cache, scale, rows in ((k_cache, scales[0], k_rows), (v_cache, scales[1], v)):
            want_codes, want_scales = quantize_rows(rows, scale_mode)
            got = read_slots(cache, layout, slots)
            assert torch.equal(got.view(torch.uint8), want_codes.view(torch.uint8))
            written = torch.zeros(cache.shape, dtype=torch.uint8)
            write_slots(written, layout, slots, torch.ones(T, NUM_KV_HEADS, D, dtype=torch.uint8))
            assert ((cache.view(torch.uint8)[written == 0] & 0x7F) == 0x7F).all()
            if with_scales:
                assert torch.equal(read_scales(scale, layout, slots), want_scales)
                touched = torch.zeros(scale.shape, dtype=torch.bool)
                page, off = slots // layout.page_size, slots % layout.page_size
                touched[page, :, off] = True
                assert scale[~touched].isnan().all()
            else:
                assert scale.isnan().all()


def test_scales_without_fp8_cache_are_refused() -> None:
    layout = KVLayout.create("nhd", 4, NUM_KV_HEADS, 8, "float32")
    cache = torch.zeros(layout.cache_shape(2))
    scale = torch.ones(layout.scale_shape(2))
    k = torch.randn(1, NUM_KV_HEADS, 8)
    with pytest.raises(ValueError, match="FP8"):
        store_kv(k, k, torch.tensor([4]), cache, cache.clone(), layout, scale, scale.clone())
