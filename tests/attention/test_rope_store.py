"""The fused rotary + K/V store kernel under the CPU interpreter vs float64 torch.

Every layout x page size, GQA group sizes 1, 3 and 4, shuffled slots, random positions; the
cache starts as NaN so that a slot written wrongly (or not at all) shows, and every slot the
kernel must not touch is checked to still be NaN.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.triton.rope_store import rope_store, store_kv  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402

NUM_KV_HEADS = 2
LAYOUT_PAGES = [("token", 1), ("nhd", 4), ("nhd", 16), ("hnd", 4), ("hnd", 16),
                ("hnd_x", 8), ("hnd_x", 16)]


def _read(cache: torch.Tensor, layout: KVLayout, slot: int) -> torch.Tensor:
    """One slot's [Hkv, D] by direct indexing of the layout's shape."""
    page, off = divmod(slot, layout.page_size)
    if layout.name == "token":
        return cache[page]
    if layout.name == "nhd":
        return cache[page, off]
    if layout.name == "hnd":
        return cache[page, :, off]
    return cache[page, :, off // layout.x, :, off % layout.x]


def _cos_sin(max_pos: int, dim: int) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], -1)


def _rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """rotate_half convention in float64; x [T, H, D], cs [T, D] (cos | sin)."""
    half = x.shape[-1] // 2
    c, s = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_rope_store_matches_float64(layout_name: str, page_size: int, group: int) -> None:
    gen = torch.Generator().manual_seed(hash((layout_name, page_size, group)) % 2**31)
    D, T, num_pages = 32, 11, 16
    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, D, "float32")
    total_slots = num_pages * layout.page_size
    slots = torch.randperm(total_slots - layout.page_size, generator=gen)[:T] + layout.page_size
    positions = torch.randint(0, 200, (T,), generator=gen)
    cs = _cos_sin(256, D)
    q = torch.randn(T, NUM_KV_HEADS * group, D, generator=gen)
    k = torch.randn(T, NUM_KV_HEADS, D, generator=gen)
    v = torch.randn(T, NUM_KV_HEADS, D, generator=gen)
    for rotate in (True, False):
        k_cache = torch.full(layout.cache_shape(num_pages), float("nan"))
        v_cache = torch.full_like(k_cache, float("nan"))
        if rotate:
            q_out = torch.full_like(q, float("nan"))
            rope_store(q, k, v, positions, cs.float(), slots, k_cache, v_cache, layout, q_out)
            want_q = _rotate(q, cs[positions])
            assert (q_out.double() - want_q).abs().max() < 1e-5
            want_k = _rotate(k, cs[positions])
        else:
            store_kv(k, v, slots, k_cache, v_cache, layout)
            want_k = k.double()
        for t, slot in enumerate(slots.tolist()):
            assert (_read(k_cache, layout, slot).double() - want_k[t]).abs().max() < 1e-5
            assert torch.equal(_read(v_cache, layout, slot), v[t])
        # every other slot untouched
        written = torch.zeros(k_cache.shape, dtype=torch.bool)
        for slot in slots.tolist():
            _read(written, layout, slot).fill_(True)
        assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all()


def test_rope_store_in_place_q() -> None:
    """q_out may alias q: each element is read before it is written."""
    gen = torch.Generator().manual_seed(3)
    layout = KVLayout.create("hnd", 4, NUM_KV_HEADS, 16, "float32")
    q = torch.randn(5, 6, 16, generator=gen)
    k = torch.randn(5, NUM_KV_HEADS, 16, generator=gen)
    positions = torch.tensor([0, 3, 17, 4, 9])
    cs = _cos_sin(32, 16)
    want = _rotate(q, cs[positions])
    cache = torch.zeros(layout.cache_shape(4))
    rope_store(q, k, k.clone(), positions, cs.float(), torch.arange(4, 9), cache, cache.clone(),
               layout, q_out=q)
    assert (q.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("page_size", [8, 16])
def test_hndx_tiles_of_consecutive_and_scattered_slots(page_size: int) -> None:
    """hnd_x stores tiles of tokens: a prompt-like run of consecutive slots that starts and
    ends mid-run, then scattered decode slots, over several tiles and a partial last one,
    in bf16 (the serving dtype; rotation in float32 then one rounding)."""
    gen = torch.Generator().manual_seed(page_size)
    D, num_pages, group = 32, 12, 2
    layout = KVLayout.create("hnd_x", page_size, NUM_KV_HEADS, D, "bfloat16")
    run = torch.arange(3, 3 + 41) + page_size  # crosses pages and 16-byte runs
    scattered = torch.randperm(num_pages * page_size - 60, generator=gen)[:9] + 60
    slots = torch.cat([run, scattered])
    T = slots.numel()
    positions = torch.randint(0, 200, (T,), generator=gen)
    cs = _cos_sin(256, D)
    q = torch.randn(T, NUM_KV_HEADS * group, D, generator=gen).bfloat16()
    k = torch.randn(T, NUM_KV_HEADS, D, generator=gen).bfloat16()
    v = torch.randn(T, NUM_KV_HEADS, D, generator=gen).bfloat16()
    k_cache = torch.full(layout.cache_shape(num_pages), float("nan"), dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    q_out = rope_store(q, k, v, positions, cs.float(), slots, k_cache, v_cache, layout)
    assert (q_out.double() - _rotate(q, cs[positions])).abs().max() < 2e-2
    want_k = _rotate(k, cs[positions])
    for t, slot in enumerate(slots.tolist()):
        assert (_read(k_cache, layout, slot).double() - want_k[t]).abs().max() < 2e-2
        assert torch.equal(_read(v_cache, layout, slot), v[t])
    written = torch.zeros(k_cache.shape, dtype=torch.bool)
    for slot in slots.tolist():
        _read(written, layout, slot).fill_(True)
    assert k_cache[~written].isnan().all() and v_cache[~written].isnan().all()
