"""The paged CPU backend against the float64 oracle: every layout and variant it supports, on
ragged mixed batches whose cached prefixes lie in runs of consecutive pages (read in place),
are shared between sequences (one matmul for all of them), or are scattered (gathered with
the tail); and the guard that a long cached prefix is never copied per layer."""

from __future__ import annotations

import random

import pytest
import torch

from attention import AttentionConfig, ForwardBatch, Variant
from attention.backends.paged import PagedBackend, _buckets, _SeqKeys, _split_keys
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig, write_slots
from tests.attention.attention_oracle import oracle_attention
from tests.attention.test_reference_backend import VARIANTS, run_case

LAYOUTS = [("token", 1), ("nhd", 4), ("nhd", 16)]


def _tables(rng: random.Random, seq_lens: list[int], prefix_lens: list[int], shared: int,
            page_size: int, num_pages: int) -> list[list[int]]:
    """Sequences 0 and 1 share their first `shared` pages (a cached system prompt); runs of
    consecutive ids of random lengths, in shuffled order, make up the rest."""
    ids = list(range(1, num_pages))
    start = rng.randrange(len(ids) - num_pages // 2)
    free = ids[start:] + ids[:start]  # consecutive ids, then wrap: runs break somewhere
    tables: list[list[int]] = []
    common = free[:shared]
    del free[: shared + 1]  # the next id stays unused: the shared run ends with the prefix
    for i, n in enumerate(seq_lens):
        need = -(-n // page_size)
        pages = list(common) if i < 2 else []
        while len(pages) < need:
            take = min(need - len(pages), rng.randint(1, 6))
            at = rng.randrange(0, max(1, len(free) - take))
            pages.extend(free[at : at + take])
            del free[at : at + take]
        tables.append(pages)
    return tables


def run_paged_case(layout_name: str, page_size: int, group: int, variant: str, param: float,
                   min_inplace_keys: int, dtype: torch.dtype = torch.float32) -> None:
    rng = random.Random()
    torch.manual_seed(rng.randrange(1 << 30))
    hkv, d = 2, 16
    hq = hkv * group
    P = page_size
    shared = rng.randint(2, 6) if P > 1 else rng.randint(8, 24)
    base = shared * P
    # two decodes sharing a cached prefix, a fresh prefill, extends over a prefix (one
    # sharing it too), a decode over a long private context
    q_lens = [1, 1, 9, 5, 1, 1]
    prefix_lens = [base + rng.randint(0, 20), base + rng.randint(0, 20), 0,
                   rng.randint(1, 30), 17, rng.randint(60, 90)]
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
    layout = KVLayout.create(layout_name, P, hkv, d, str(dtype))
    num_pages = sum(-(-n // P) for n in seq_lens) + 8
    pool = KVPool(KVPoolConfig(layout, 1, num_pages, dtype, torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.fill_(float("nan"))  # unwritten slots must never be read
    tables = _tables(rng, seq_lens, prefix_lens, shared, P, num_pages)
    ks = [torch.randn(n, hkv, d) for n in seq_lens]
    vs = [torch.randn(n, hkv, d) for n in seq_lens]
    ks[1][:base], vs[1][:base] = ks[0][:base], vs[0][:base]  # the shared pages hold one prefix
    qs = [torch.randn(n, hq, d) for n in q_lens]
    for table, p, k, v in zip(tables, prefix_lens, ks, vs, strict=True):
        slots = torch.tensor([table[i // P] * P + i % P for i in range(p)], dtype=torch.long)
        write_slots(pool.k_caches[0], layout, slots, k[:p])
        write_slots(pool.v_caches[0], layout, slots, v[:p])
    scale = d**-0.5
    backend = PagedBackend(AttentionConfig(hq, hkv, d, scale, Variant(variant, param)), pool,
                           min_inplace_keys=min_inplace_keys)
    batch = ForwardBatch.build(q_lens, prefix_lens, tables, P, torch.device("cpu"))
    backend.plan(batch)
    if min_inplace_keys <= base:  # the shared prefix is one run, attended once for both
        assert any(r.rows.tolist()[:2] == [0, 1] for r in backend.runs)
    new_k = torch.cat([k[p:] for k, p in zip(ks, prefix_lens, strict=True)])
    new_v = torch.cat([v[p:] for v, p in zip(vs, prefix_lens, strict=True)])
    out = backend.forward(torch.cat(qs).to(dtype), new_k.to(dtype), new_v.to(dtype), 0)
    assert not torch.isnan(out).any()
    offs = batch.qo_indptr_host
    for i in range(len(q_lens)):
        want = oracle_attention(qs[i], ks[i], vs[i], prefix_lens[i], scale, variant, param)
        got = out[offs[i] : offs[i + 1]].double()
        err = (got - want).norm() / want.norm().clamp(min=1e-12)
        assert err < (1e-5 if dtype == torch.float32 else 1e-12), (i, float(err))


@pytest.mark.parametrize(("layout", "page_size"), LAYOUTS)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize(("variant", "param"), VARIANTS)
@pytest.mark.parametrize("min_inplace_keys", [1, 8])
def test_paged_backend_matches_oracle(layout: str, page_size: int, group: int, variant: str,
                                      param: float, min_inplace_keys: int) -> None:
    run_paged_case(layout, page_size, group, variant, param, min_inplace_keys)


def test_paged_backend_float64_pool() -> None:
    run_paged_case("nhd", 4, 3, "alibi", 0.0, 1, dtype=torch.float64)


@pytest.mark.parametrize(("layout", "page_size"), LAYOUTS[:2])
def test_paged_backend_on_shuffled_pages(layout: str, page_size: int) -> None:
    """The reference backend's own cases (page ids shuffled: everything is tail)."""
    run_case("paged", layout, page_size, 3, "softmax", 0.0)


def test_split_keys_cuts_runs_at_page_breaks_and_the_prefix() -> None:
    # pages 5,6,7 then 9 (page size 4): keys 0..11 are one run, 12..13 another (page 9),
    # 14..15 are new tokens in the last page
    runs, rest = _split_keys([5, 6, 7, 9], 4, prefix_len=14, seq_len=16)
    assert runs == [(20, 12, 0), (36, 2, 12)]
    assert rest == [14, 15]
    runs, rest = _split_keys([5, 6, 7, 8], 4, prefix_len=14, seq_len=16)
    assert runs == [(20, 14, 0)] and rest == [14, 15]


def test_short_private_runs_are_gathered_and_shared_ones_read_in_place() -> None:
    layout = KVLayout.create("nhd", 4, 1, 8, "float32")
    pool = KVPool(KVPoolConfig(layout, 1, 40, torch.float32, torch.device("cpu")))
    backend = PagedBackend(AttentionConfig(2, 1, 8, 0.3), pool, min_inplace_keys=16)
    # seq 0 and 1 share pages 1-3 (12 keys, x2 sharers >= 16); seq 2's 12 keys are its own
    tables = [[1, 2, 3, 10], [1, 2, 3, 20], [30, 31, 32, 33]]
    backend.plan(ForwardBatch.build([1, 1, 1], [12, 12, 12], tables, 4, torch.device("cpu")))
    assert [(r.slot_start, r.num_keys, r.rows.tolist()) for r in backend.runs] == [(4, 12, [0, 1])]
    assert sorted(tb.kv_slots.shape[1] for tb in backend.tails) == [1, 13]


def test_tail_buckets_keep_padding_near_the_real_work() -> None:
    def seq(q: int, k: int) -> _SeqKeys:
        return _SeqKeys(0, q, 0, list(range(k)), list(range(k)))

    groups = _buckets([seq(1, 80)] * 32 + [seq(1000, 1000), seq(64, 64), seq(64, 70)])
    sizes = sorted(len(g) for g in groups)
    # the 32 decodes batch together, so do the two short extends; the long chunk stays alone
    assert sizes == [1, 2, 32]


def test_the_cpu_default_is_paged_where_it_reads_the_layout() -> None:
    from attention.registry import PAGED_LAYOUTS, default_backend

    assert PAGED_LAYOUTS == PagedBackend.supported_layouts
    assert default_backend("cpu", "nhd") == "paged"
    assert default_backend("cpu", "hnd") == "reference"
    assert default_backend("cuda", "nhd") == "triton"


@pytest.mark.parametrize(("variant", "param"), [("softmax", 0.0), ("alibi", 0.0)])
def test_a_lone_fresh_prompt_takes_the_causal_kernel(variant: str, param: float) -> None:
    layout = KVLayout.create("nhd", 4, 2, 16, "float32")
    pool = KVPool(KVPoolConfig(layout, 1, 8, torch.float32, torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.fill_(float("nan"))
    q, k, v = torch.randn(11, 6, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    backend = PagedBackend(AttentionConfig(6, 2, 16, 0.25, Variant(variant, param)), pool)
    backend.plan(ForwardBatch.build([11], [0], [[5, 2, 7]], 4, torch.device("cpu")))
    assert [tb.causal for tb in backend.tails] == [True]
    want = oracle_attention(q, k, v, 0, 0.25, variant, param)
    assert torch.allclose(backend.forward(q, k, v, 0).double(), want, atol=1e-5)


@pytest.mark.parametrize(("variant", "param"), [("softmax", 0.0), ("sliding_window", 5.0),
                                                ("alibi", 0.0), ("silu", 0.0)])
def test_a_decode_bucket_without_runs_folds_the_group_into_rows(variant: str, param: float) -> None:
    """Decodes over short private contexts: one gathered bucket, through SDPA with the GQA
    group as query rows where the variant allows (else the explicit path)."""
    hkv, group, d, P = 2, 3, 16, 4
    hq = hkv * group
    layout = KVLayout.create("nhd", P, hkv, d, "float32")
    prefix_lens = [3, 10, 17]
    pool = KVPool(KVPoolConfig(layout, 1, 16, torch.float32, torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.fill_(float("nan"))
    tables = [[9, 2], [4, 11, 6], [1, 13, 8, 15, 3]]
    ks = [torch.randn(p + 1, hkv, d) for p in prefix_lens]
    vs = [torch.randn(p + 1, hkv, d) for p in prefix_lens]
    for table, p, k, v in zip(tables, prefix_lens, ks, vs, strict=True):
        slots = torch.tensor([table[i // P] * P + i % P for i in range(p)], dtype=torch.long)
        write_slots(pool.k_caches[0], layout, slots, k[:p])
        write_slots(pool.v_caches[0], layout, slots, v[:p])
    cfg = AttentionConfig(hq, hkv, d, d**-0.5, Variant(variant, param))
    backend = PagedBackend(cfg, pool)
    backend.plan(ForwardBatch.build([1, 1, 1], prefix_lens, tables, P, torch.device("cpu")))
    assert not backend.runs and [tb.final for tb in backend.tails] == [True]
    q = torch.randn(3, hq, d)
    out = backend.forward(q, torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]), 0)
    for i, p in enumerate(prefix_lens):
        want = oracle_attention(q[i : i + 1], ks[i], vs[i], p, d**-0.5, variant, param)
        assert torch.allclose(out[i : i + 1].double(), want, atol=1e-5), i


def test_auto_backend_on_the_cpu_serves_the_cache_it_is_given() -> None:
    from attention.registry import default_backend

    assert default_backend("cpu", "nhd", "kv", fp8=True) == "reference"
    assert default_backend("cpu", "nhd", "latent") == "reference"
    assert default_backend("cpu", "token", "kv", fp8=False) == "paged"
