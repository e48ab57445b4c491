"""The reference backend (and the SDPA and FlexAttention peers) against the float64 oracle, over every layout,
page size, GQA group and variant, on ragged mixed batches with cached prefixes."""

from __future__ import annotations

import random

import pytest
import torch

from attention import AttentionConfig, ForwardBatch, Variant, create_backend
from attention.variants import variants_of_peer
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig, write_slots
from tests.attention.attention_oracle import oracle_attention, random_page_tables

VARIANTS = [("softmax", 0.0), ("softcap", 5.0), ("sliding_window", 7.0), ("alibi", 0.0),
            ("sigmoid", 0.0), ("silu", 0.0)]
LAYOUTS = [("token", 1), ("nhd", 16), ("hnd", 4), ("hnd_x", 8), ("nhd", 256)]


def run_case(backend_name: str, layout_name: str, page_size: int, group: int, variant: str,
             param: float, dtype: torch.dtype = torch.float32) -> None:
    rng = random.Random()
    torch.manual_seed(rng.randrange(1 << 30))
    hkv, d = 2, 16
    hq = hkv * group
    # ragged: two decodes, then a fresh prefill, an extend over a prefix, a 1-token extend
    q_lens = [1, 1, 9, 5, 1]
    prefix_lens = [rng.randint(1, 40), rng.randint(1, 40), 0, rng.randint(1, 30), 17]
    num_decodes = 2
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
    layout = KVLayout.create(layout_name, page_size, hkv, d, str(dtype))
    num_pages = sum(-(-n // layout.page_size) for n in seq_lens) + 3
    pool = KVPool(KVPoolConfig(layout, 1, num_pages, dtype, torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.fill_(float("nan"))  # unwritten slots must never be read
    tables = random_page_tables(seq_lens, layout.page_size, num_pages, rng)
    ks = [torch.randn(n, hkv, d) for n in seq_lens]
    vs = [torch.randn(n, hkv, d) for n in seq_lens]
    qs = [torch.randn(n, hq, d) for n in q_lens]
    for table, p, k, v in zip(tables, prefix_lens, ks, vs, strict=True):
        slots = torch.tensor([table[i // layout.page_size] * layout.page_size + i % layout.page_size
                              for i in range(p)], dtype=torch.long)
        write_slots(pool.k_caches[0], layout, slots, k[:p])
        write_slots(pool.v_caches[0], layout, slots, v[:p])
    scale = d**-0.5
    cfg = AttentionConfig(hq, hkv, d, scale, Variant(variant, param))
    backend = create_backend(backend_name, cfg, pool)
    batch = ForwardBatch.build(q_lens, prefix_lens, tables, layout.page_size, torch.device("cpu"),
                               num_decodes=num_decodes)
    backend.plan(batch)
    new_k = torch.cat([k[p:] for k, p in zip(ks, prefix_lens, strict=True)])
    new_v = torch.cat([v[p:] for v, p in zip(vs, prefix_lens, strict=True)])
    out = backend.forward(torch.cat(qs).to(dtype), new_k.to(dtype), new_v.to(dtype), 0)
    assert not torch.isnan(out).any()
    offs = batch.qo_indptr_host
    for i in range(len(q_lens)):
        want = oracle_attention(qs[i].to(dtype), ks[i].to(dtype), vs[i].to(dtype), prefix_lens[i],
                                scale, variant, param)
        got = out[offs[i] : offs[i + 1]].double()
        err = (got - want).norm() / want.norm().clamp(min=1e-12)
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (i, float(err))


@pytest.mark.parametrize(("layout", "page_size"), LAYOUTS)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize(("variant", "param"), VARIANTS)
def test_reference_backend_matches_oracle(layout: str, page_size: int, group: int, variant: str,
                                          param: float) -> None:
    run_case("reference", layout, page_size, group, variant, param)


@pytest.mark.parametrize(("layout", "page_size"), LAYOUTS[:4])
@pytest.mark.parametrize(("variant", "param"),
                         [v for v in VARIANTS if v[0] in variants_of_peer("sdpa")])
def test_sdpa_backend_matches_oracle(layout: str, page_size: int, variant: str, param: float) -> None:
    run_case("sdpa", layout, page_size, 3, variant, param)


@pytest.mark.parametrize(("layout", "page_size"), LAYOUTS[:4])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize(("variant", "param"),
                         [v for v in VARIANTS if v[0] in variants_of_peer("flex")])
def test_flex_backend_matches_oracle(layout: str, page_size: int, group: int, variant: str,
                                     param: float) -> None:
    run_case("flex", layout, page_size, group, variant, param)


def test_flex_backend_pads_single_row_groups() -> None:
    """A lone decode and a lone one-token prefill (batch, query and key lengths of 1, which
    the flex backend pads to 2) still come out right."""
    from attention.backends.flex import _pad_to_two

    t = torch.tensor([[5]])
    assert _pad_to_two(t, (0, 1), None).tolist() == [[5, 5], [5, 5]]
    assert _pad_to_two(t.bool(), (0, 1), False).tolist() == [[True, False], [False, False]]
    for _ in range(3):
        run_single_case("flex")


def run_single_case(backend_name: str) -> None:
    hkv, hq, d, P = 2, 6, 16, 4
    layout = KVLayout.create("nhd", P, hkv, d, "float32")
    pool = KVPool(KVPoolConfig(layout, 1, 8, torch.float32, torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.fill_(float("nan"))
    k, v, q = torch.randn(1, hkv, d), torch.randn(1, hkv, d), torch.randn(1, hq, d)
    cfg = AttentionConfig(hq, hkv, d, d**-0.5, Variant("softmax"))
    backend = create_backend(backend_name, cfg, pool)
    batch = ForwardBatch.build([1], [0], [[3]], P, torch.device("cpu"), num_decodes=0)
    backend.plan(batch)
    out = backend.forward(q, k, v, 0)
    want = oracle_attention(q, k, v, 0, d**-0.5, "softmax", 0.0)
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_reference_backend_bfloat16_pool() -> None:
    run_case("reference", "hnd_x", 16, 4, "softmax", 0.0, dtype=torch.bfloat16)
