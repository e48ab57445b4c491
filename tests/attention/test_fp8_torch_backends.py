"""The torch backends on FP8 pages: `reference` (the oracle: dequantize, then attend) and
the `sdpa`/`flex` peers (which dequantize a gathered copy) against the float64 oracle on
the dequantized K/V, on a ragged batch of decodes, a prefill and extends."""

from __future__ import annotations

import random

import pytest
import torch

from attention import AttentionConfig, ForwardBatch, Variant, create_backend
from kvcache.kv_dtype import PER_TENSOR, PER_TOKEN_HEAD, KVCacheDtype, dequantize_rows, quantize_rows
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig
from tests.attention.attention_oracle import oracle_attention, random_page_tables


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("layout_name", "page_size"), [("token", 1), ("hnd_x", 16)])
@pytest.mark.parametrize("backend_name", ["reference", "sdpa", "flex"])
def test_torch_backends_on_fp8_pages(backend_name: str, layout_name: str, page_size: int,
                                     scale_mode: str) -> None:
    rng = random.Random()
    torch.manual_seed(rng.randrange(1 << 30))
    hkv, d, group = 2, 16, 3
    q_lens = [1, 1, 9, 5]
    prefix_lens = [rng.randint(1, 40), rng.randint(1, 40), 0, rng.randint(1, 30)]
    seq_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
    spec = KVCacheDtype(torch.float8_e4m3fn, scale_mode)
    layout = KVLayout.create(layout_name, page_size, hkv, d, spec.storage_name)
    num_pages = sum(-(-n // layout.page_size) for n in seq_lens) + 3
    pool = KVPool(KVPoolConfig(layout, 1, num_pages, torch.float32, torch.device("cpu"), spec))
    tables = random_page_tables(seq_lens, layout.page_size, num_pages, rng)
    mags = [torch.logspace(-2, 2, n)[torch.randperm(n)][:, None, None] for n in seq_lens]
    ks = [torch.randn(n, hkv, d) * m for n, m in zip(seq_lens, mags, strict=True)]
    vs = [torch.randn(n, hkv, d) for n in seq_lens]
    qs = [torch.randn(n, hkv * group, d) * 0.1 for n in q_lens]
    for table, p, k, v in zip(tables, prefix_lens, ks, vs, strict=True):
        slots = torch.tensor([table[i // page_size] * page_size + i % page_size
                              for i in range(p)], dtype=torch.long)
        pool.store(0, k[:p], v[:p], slots)
    cfg = AttentionConfig(hkv * group, hkv, d, d**-0.5, Variant("softmax"))
    backend = create_backend(backend_name, cfg, pool)
    batch = ForwardBatch.build(q_lens, prefix_lens, tables, layout.page_size,
                               torch.device("cpu"), num_decodes=2)
    backend.plan(batch)
    out = backend.forward(torch.cat(qs), torch.cat([k[p:] for k, p in zip(ks, prefix_lens,
                                                                          strict=True)]),
                          torch.cat([v[p:] for v, p in zip(vs, prefix_lens, strict=True)]), 0)
    offs = batch.qo_indptr_host
    for i in range(len(q_lens)):
        k_deq, v_deq = (dequantize_rows(*quantize_rows(x, scale_mode), torch.float64)
                        for x in (ks[i], vs[i]))
        want = oracle_attention(qs[i], k_deq, v_deq, prefix_lens[i], d**-0.5)
        err = (out[offs[i] : offs[i + 1]].double() - want).norm() / want.norm()
        assert err < 1e-5, (i, float(err))
