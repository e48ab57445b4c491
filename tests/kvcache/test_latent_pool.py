"""The MLA latent pool: rows land at their slots for every page size, capacity follows the
1,152 bytes a token a layer of a bf16 latent, and K/V-only layouts are refused."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache_spec import KVHeadsSpec, LatentSpec, bytes_per_token, uniform_spec
from kvcache.latent_pool import LatentLayout, LatentPool
from kvcache.pool import KVPool, pages_for_tokens


def test_latent_row_costs_1152_bytes_a_layer_in_bf16():
    spec = LatentSpec(kv_lora_rank=512, rope_dim=64)
    assert spec.row_width == 576
    assert bytes_per_token(spec, 1, "bfloat16") == 1152
    assert bytes_per_token(spec, 27, "torch.bfloat16") == 27 * 1152
    assert bytes_per_token(spec, 1, "float32") == 2304
    # against K/V of the same model seen as MHA (16 heads x (192 | 128)): ~8x smaller
    assert bytes_per_token(KVHeadsSpec(16, 160), 1, "bfloat16") == 2 * 16 * 160 * 2
    layout = spec.make_layout("nhd", 64, "bfloat16")
    assert layout.bytes_per_page(27) == 27 * 64 * 1152


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_store_then_read_rows_at_slots(page_size):
    spec = LatentSpec(kv_lora_rank=32, rope_dim=8)
    layout = spec.make_layout("nhd", page_size, "float32")
    num_pages = pages_for_tokens(layout, 200)
    pool = spec.build_pool(layout, 2, num_pages, torch.float32, torch.device("cpu"))
    assert isinstance(pool, LatentPool)
    assert pool.caches[1].shape == (num_pages, page_size, 40)
    assert pool.num_tokens == (num_pages - 1) * page_size >= 200
    slots = torch.randperm(pool.num_tokens)[:50] + page_size  # never the scratch page
    rows = torch.randn(50, 40)
    pool.store(1, rows, slots)
    torch.testing.assert_close(pool.read(1, slots), rows, rtol=0, atol=0)
    page, off = slots // page_size, slots % page_size
    torch.testing.assert_close(pool.caches[1][page, off], rows, rtol=0, atol=0)
    assert not pool.caches[0].any()  # other layers untouched
    assert pool.nbytes == 2 * num_pages * page_size * 40 * 4


def test_token_layout_means_pages_of_one():
    layout = LatentSpec(16, 8).make_layout("token", 16, "bfloat16")
    assert isinstance(layout, LatentLayout) and layout.page_size == 1


@pytest.mark.parametrize("name", ["hnd", "hnd_x"])
def test_head_major_layouts_are_refused(name):
    with pytest.raises(ValueError, match="does not apply to an MLA latent cache"):
        LatentSpec(512, 64).make_layout(name, 16, "bfloat16")


def test_kv_spec_builds_the_kv_pool_and_mixed_specs_are_refused():
    spec = KVHeadsSpec(2, 8)
    layout = spec.make_layout("hnd", 4, "float32")
    assert isinstance(spec.build_pool(layout, 1, 3, torch.float32, torch.device("cpu")), KVPool)
    assert uniform_spec([spec, spec]) == spec
    with pytest.raises(ValueError, match="different cache specs"):
        uniform_spec([spec, LatentSpec(16, 8)])
