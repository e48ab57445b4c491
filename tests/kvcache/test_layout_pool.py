"""KV layouts: tensor shapes, index math and the pool's scatter/gather agree."""

import math

import pytest
import torch

from kvcache.layout import HND_ID, HNDX_ID, LAYOUT_NAMES, NHD_ID, KVLayout, page_size_for
from kvcache.pool import read_slots, write_slots

LAYOUT_PAGE_SIZES = [("token", 1)] + [
    (name, p) for name in LAYOUT_NAMES if name != "token" for p in (1, 16, 32)
    if not (name == "hnd_x" and p == 1)
]


@pytest.mark.parametrize(("name", "page_size"), LAYOUT_PAGE_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_matches_element_offset(name: str, page_size: int, dtype: torch.dtype) -> None:
    layout = KVLayout.create(name, page_size, num_kv_heads=3, head_dim=8, dtype_name=str(dtype))
    num_pages = max(7, 40 // layout.page_size)
    cache = torch.full(layout.cache_shape(num_pages), float("nan"), dtype=dtype)
    slots = torch.randperm(num_pages * layout.page_size)[:20]
    values = torch.randn(20, 3, 8).to(dtype)
    write_slots(cache, layout, slots, values)
    flat = cache.reshape(-1)
    P = layout.page_size
    for t, slot in enumerate(slots.tolist()):
        for h in range(3):
            for d in range(8):
                idx = layout.element_offset(slot // P, slot % P, h, d)
                assert flat[idx] == values[t, h, d]
    assert torch.equal(read_slots(cache, layout, slots), values)


@pytest.mark.parametrize(("name", "page_size"), LAYOUT_PAGE_SIZES)
def test_key_rows_view_addresses_the_keys_kernels_copy(name: str, page_size: int) -> None:
    """Bulk copies read a key of a head as a row of `cache.view(-1, *key_rows_view())`:
    nhd row page*P + off at column head*D, hnd row (page*H + head)*P + off, hnd_x row
    ((page*H + head)*P + off) // x holding x keys (the row math of extend.py/extend_sm90.py)."""
    layout = KVLayout.create(name, page_size, num_kv_heads=3, head_dim=8, dtype_name="bfloat16")
    shape = layout.cache_shape(4)
    cache = torch.arange(math.prod(shape)).view(shape)
    view = cache.view(-1, *layout.key_rows_view())
    P, H = layout.page_size, layout.num_kv_heads
    for page, off, head in [(0, 0, 0), (3, P - 1, 2), (1, P // 2, 1)]:
        expect = torch.tensor([layout.element_offset(page, off, head, d) for d in range(8)])
        if layout.kernel_id == NHD_ID:
            got = view[page * P + off, head * 8 : head * 8 + 8]
        elif layout.kernel_id == HND_ID:
            got = view[(page * H + head) * P + off]
        else:
            got = view[((page * H + head) * P + off) // layout.x, :, off % layout.x]
        assert torch.equal(got, expect)


def test_token_is_nhd_with_page_size_one() -> None:
    token = KVLayout.create("token", 16, 3, 8, "bfloat16")
    assert token.page_size == 1 and page_size_for("token", 16) == 1
    assert page_size_for("nhd", 16) == 16
    nhd1 = KVLayout.create("nhd", 1, 3, 8, "bfloat16")
    assert token.kernel_id == nhd1.kernel_id and token.strides() == nhd1.strides()
    with pytest.raises(ValueError, match="page size 1"):
        KVLayout("token", 16, 3, 8)
    assert {KVLayout.create(n, 16, 3, 8, "bfloat16").kernel_id for n in LAYOUT_NAMES} == {
        NHD_ID, HND_ID, HNDX_ID}


def test_hnd_x_vector_width() -> None:
    assert KVLayout.create("hnd_x", 16, 2, 8, "bfloat16").x == 8
    assert KVLayout.create("hnd_x", 16, 2, 8, "float32").x == 4
    with pytest.raises(ValueError, match="multiple of x"):
        KVLayout.create("hnd_x", 4, 2, 8, "bfloat16")
    with pytest.raises(ValueError, match="unknown KV layout"):
        KVLayout.create("nope", 16, 2, 8, "bfloat16")
