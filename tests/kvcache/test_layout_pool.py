"""KV layouts: tensor shapes, index math and the pool's scatter/gather agree."""

import pytest
import torch

from kvcache.layout import LAYOUT_NAMES, KVLayout
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
    # strides() describe the same map
    s_page, s_off, s_head, s_dim, s_xblk = layout.strides()
    for slot in slots.tolist()[:5]:
        page, off = divmod(slot, P)
        if name == "hnd_x":
            base = page * s_page + (off // layout.x) * s_xblk + (off % layout.x) * s_off
        else:
            base = page * s_page + off * s_off
        assert base + 2 * s_head + 5 * s_dim == layout.element_offset(page, off, 2, 5)


def test_hnd_x_vector_width() -> None:
    assert KVLayout.create("hnd_x", 16, 2, 8, "bfloat16").x == 8
    assert KVLayout.create("hnd_x", 16, 2, 8, "float32").x == 4
    with pytest.raises(ValueError, match="multiple of x"):
        KVLayout.create("hnd_x", 4, 2, 8, "bfloat16")
    with pytest.raises(ValueError, match="unknown KV layout"):
        KVLayout.create("nope", 16, 2, 8, "bfloat16")
