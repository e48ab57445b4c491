"""The KV cache dtype: flags, bytes per token and capacity, and the pool's FP8 store/gather
with its scales beside the pages, for every layout."""

from __future__ import annotations

import pytest
import torch

from kvcache.kv_dtype import (
    FP8_E4M3_MAX,
    PER_TENSOR,
    PER_TOKEN_HEAD,
    KVCacheDtype,
    dequantize_rows,
    quantize_rows,
)
from kvcache.layout import KVLayout
from kvcache.pool import (
    KVPool,
    KVPoolConfig,
    bytes_per_page,
    pages_for_memory,
    read_scales,
    read_slots,
)

FP8 = torch.float8_e4m3fn
LAYOUT_PAGES = [("token", 1), ("nhd", 16), ("hnd", 4), ("hnd_x", 16), ("hnd_x", 32)]


def test_flags_resolve_as_vllm_spells_them() -> None:
    assert KVCacheDtype.from_flags("auto", PER_TOKEN_HEAD, torch.bfloat16) == KVCacheDtype(
        torch.bfloat16)
    for name in ("fp8", "fp8_e4m3"):
        spec = KVCacheDtype.from_flags(name, PER_TOKEN_HEAD, torch.bfloat16)
        assert spec.dtype == FP8 and spec.has_scales and spec.name == "fp8_e4m3"
    per_tensor = KVCacheDtype.from_flags("fp8", PER_TENSOR, torch.float32)
    assert per_tensor.is_fp8 and not per_tensor.has_scales
    with pytest.raises(ValueError, match="kv-cache-dtype"):
        KVCacheDtype.from_flags("int8", PER_TOKEN_HEAD, torch.float32)
    with pytest.raises(ValueError, match="kv-cache-scale"):
        KVCacheDtype.from_flags("fp8", "per-block", torch.float32)


def test_fp8_holds_about_twice_the_tokens_at_the_same_memory() -> None:
    """Llama-3-8B's KV geometry (8 KV heads of 128, 32 layers): bf16 takes 256 bytes a row,
    FP8 128 codes + a 4-byte scale, so the same bytes hold 256/132 = 1.94x the tokens."""
    bf16, fp8 = KVCacheDtype(torch.bfloat16), KVCacheDtype(FP8, PER_TOKEN_HEAD)
    assert bf16.bytes_per_token(8, 128) == 2 * 8 * 256
    assert fp8.bytes_per_token(8, 128) == 2 * 8 * 132
    assert KVCacheDtype(FP8, PER_TENSOR).bytes_per_token(8, 128) == 2 * 8 * 128
    memory = 8 * 2**30
    pages = {}
    for spec in (bf16, fp8):
        layout = KVLayout.create("nhd", 16, 8, 128, spec.storage_name)
        assert bytes_per_page(layout, 32, spec) == 32 * 16 * spec.bytes_per_token(8, 128)
        pages[spec.name] = pages_for_memory(layout, 32, spec, memory)
    assert pages["fp8_e4m3"] / pages["bfloat16"] == pytest.approx(256 / 132, rel=1e-3)


def test_quantize_rows_definition() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [1e-4, 3e-4, -2e-4]])
    codes, scales = quantize_rows(x, PER_TOKEN_HEAD)
    assert scales.tolist()[0] == 1.0  # an all-zero row
    assert scales[1].item() == pytest.approx(2.0 / FP8_E4M3_MAX)
    assert codes.float().abs().amax(-1)[1:].tolist() == [FP8_E4M3_MAX, FP8_E4M3_MAX]
    back = dequantize_rows(codes, scales, torch.float64)
    assert ((back - x.double()).abs() <= x.double().abs() * 2**-4 + 1e-12).all()  # 3 mantissa bits
    # per-tensor: saturated at 448; below 2^-6 the subnormal step is 2^-9
    codes, none = quantize_rows(torch.tensor([[1000.0, -0.001, 3.3]]), PER_TENSOR)
    assert none is None and codes.float().tolist() == [[448.0, -0.001953125, 3.25]]


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("name", "page_size"), LAYOUT_PAGES)
def test_pool_stores_codes_and_scales_beside_the_pages(name: str, page_size: int,
                                                       scale_mode: str) -> None:
    spec = KVCacheDtype(FP8, scale_mode)
    layout = KVLayout.create(name, page_size, 3, 16, spec.storage_name)
    num_pages = 64 // layout.page_size + 1
    pool = KVPool(KVPoolConfig(layout, 2, num_pages, torch.float32, torch.device("cpu"), spec))
    assert pool.k_caches[0].dtype == FP8 and layout.x == 16
    if scale_mode == PER_TENSOR:
        assert pool.k_scales == [] and pool.scales(1) == (None, None)
        assert pool.nbytes == 2 * 2 * num_pages * layout.page_size * 3 * 16
    else:
        assert pool.k_scales[1].shape == (num_pages, 3, layout.page_size)
        assert pool.nbytes == 2 * 2 * num_pages * layout.page_size * 3 * (16 + 4)
    gen = torch.Generator().manual_seed(page_size)
    slots = torch.randperm(num_pages * layout.page_size, generator=gen)[:20]
    k = torch.randn(20, 3, 16, generator=gen) * torch.logspace(-2, 2, 20)[:, None, None]
    v = torch.randn(20, 3, 16, generator=gen)
    pool.store(1, k, v, slots)
    keys, vals = pool.gather(1, slots.view(4, 5), torch.float64)
    for got, rows, cache, scales in ((keys, k, pool.k_caches[1], pool.scales(1)[0]),
                                     (vals, v, pool.v_caches[1], pool.scales(1)[1])):
        codes, row_scales = quantize_rows(rows, scale_mode)
        assert torch.equal(read_slots(cache, layout, slots).view(torch.uint8),
                           codes.view(torch.uint8))
        if scales is not None:
            assert torch.equal(read_scales(scales, layout, slots), row_scales)
        assert torch.equal(got.view(20, 3, 16), dequantize_rows(codes, row_scales, torch.float64))
    assert not pool.k_caches[0].view(torch.uint8).any()  # the other layer is untouched


def test_pool_refuses_a_layout_of_another_element_size() -> None:
    layout = KVLayout.create("hnd_x", 16, 2, 8, "bfloat16")  # x = 8: a bf16 layout
    with pytest.raises(ValueError, match="byte elements"):
        KVPool(KVPoolConfig(layout, 1, 4, torch.bfloat16, torch.device("cpu"),
                            KVCacheDtype(FP8, PER_TOKEN_HEAD)))
