"""The Triton MLA kernels under the CPU interpreter vs an independent float64 reference:
decode (heads as the rows of one dot) and prefill/extend over a paged latent prefix, page
sizes 1, 16 and 64, ragged lengths, one and several KV splits, NaN in every cache slot no
sequence owns (the scratch page included) and a NaN-poisoned output; the fused rotary +
latent store; and the `triton` MLA backend against the reference one on a mixed step."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.base import RopeInputs  # noqa: E402
from attention.batch import ForwardBatch  # noqa: E402
from attention.mla.base import MLAConfig  # noqa: E402
from attention.mla.kernels import MLAKernelConfig, mla_attention  # noqa: E402
from attention.mla.reference import MLAReferenceBackend  # noqa: E402
from attention.mla.rope_store import mla_rope_store  # noqa: E402
from attention.mla.triton_backend import MLATritonBackend  # noqa: E402
from attention.rotary import rotate  # noqa: E402
from attention.triton.decode import SplitBuffers  # noqa: E402
from kvcache.cache_spec import LatentSpec  # noqa: E402

RANK, ROPE = 32, 16
SMALL = MLAKernelConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


def _paged_rows(rows: list[torch.Tensor], page_size: int, gen: torch.Generator):
    """Each sequence's rows [L, RANK + ROPE] on shuffled pages of a NaN-filled cache."""
    need = [-(-r.shape[0] // page_size) for r in rows]
    num_pages = sum(need) + 3  # scratch page 0 and unowned pages stay NaN
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    cache = torch.full((num_pages, page_size, rows[0].shape[1]), float("nan"))
    table = torch.zeros(len(rows), max(need) + 2, dtype=torch.int32)  # spare columns: page 0
    for b, r in enumerate(rows):
        pages = [ids.pop() for _ in range(need[b])]
        table[b, : need[b]] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(r.shape[0]):
            cache[pages[pos // page_size], pos % page_size] = r[pos]
    return cache, table


def _reference(q: list[torch.Tensor], rows: list[torch.Tensor], scale: float,
               rank: int = RANK) -> torch.Tensor:
    """float64: q[b] [q_len, H, D] attends causally to rows[b] [L, D] (its last q_len rows
    are its own tokens); value = the first RANK columns."""
    outs = []
    for qb, kv in zip(q, rows, strict=True):
        qb, kv = qb.double(), kv.double()
        L, q_len = kv.shape[0], qb.shape[0]
        for j in range(q_len):
            visible = kv[: L - q_len + j + 1]
            p = torch.softmax(qb[j] @ visible.T * scale, dim=-1)  # [H, n]
            outs.append(p @ visible[:, :rank])
    return torch.stack(outs)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("num_heads", [4, 20])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_float64(page_size, num_heads, num_splits):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    seq_lens = [37, 5, 70, 1, 16]
    rows = [torch.randn(n, RANK + ROPE, generator=gen) for n in seq_lens]
    q = [torch.randn(1, num_heads, RANK + ROPE, generator=gen) for _ in seq_lens]
    cache, table = _paged_rows(rows, page_size, gen)
    out = torch.full((len(seq_lens), num_heads, RANK), float("nan"))
    scale = 0.11
    mla_attention(torch.cat(q), cache, RANK, None, torch.tensor(seq_lens, dtype=torch.int32),
                  table, out, scale, 1, num_splits, SplitBuffers.empty(cache.device), SMALL)
    torch.testing.assert_close(out.double(), _reference(q, rows, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_extend_over_a_paged_prefix_matches_float64(page_size, num_splits):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    num_heads = 3  # rows of a block span tokens: 16 rows = 5 tokens and a head
    prefix_lens, q_lens = [0, 23, 40, 7], [9, 1, 17, 6]
    rows = [torch.randn(p + n, RANK + ROPE, generator=gen) for p, n in zip(prefix_lens, q_lens, strict=True)]
    q = [torch.randn(n, num_heads, RANK + ROPE, generator=gen) for n in q_lens]
    cache, table = _paged_rows(rows, page_size, gen)
    indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([p + n for p, n in zip(prefix_lens, q_lens, strict=True)], dtype=torch.int32)
    out = torch.full((sum(q_lens), num_heads, RANK), float("nan"))
    mla_attention(torch.cat(q), cache, RANK, indptr, seq_lens, table, out, 0.2, max(q_lens),
                  num_splits, SplitBuffers.empty(cache.device), SMALL)
    torch.testing.assert_close(out.double(), _reference(q, rows, 0.2), rtol=1e-5, atol=1e-5)


def test_deepseek_widths_decode():
    """rank 512 + rope 64 and 16 heads (DeepSeek-V2-Lite's attention), two splits."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    rows = [torch.randn(n, 576, generator=gen) * 0.3 for n in (40, 9)]
    q = [torch.randn(1, 16, 576, generator=gen) * 0.3 for _ in rows]
    cache, table = _paged_rows(rows, 16, gen)
    out = torch.full((2, 16, 512), float("nan"))
    mla_attention(torch.cat(q), cache, 512, None, torch.tensor([40, 9], dtype=torch.int32),
                  table, out, 192**-0.5, 1, 2, None, SMALL)
    torch.testing.assert_close(out.double(), _reference(q, rows, 192**-0.5, rank=512),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotate_too", [True, False])
def test_rope_store_matches_torch(rotate_too):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    T, H = 7, 5
    q = torch.randn(T, H, RANK + ROPE, generator=gen)
    k = torch.randn(T, 1, RANK + ROPE, generator=gen)
    positions = torch.tensor([0, 3, 9, 10, 31, 2, 5])
    cos_sin = torch.randn(40, ROPE, generator=gen)  # any table: the kernel reads what it gets
    cache = torch.full((6, 16, RANK + ROPE), float("nan"))
    slots = torch.tensor([17, 18, 40, 95, 33, 16, 64])
    q_in = q.clone()
    if rotate_too:
        mla_rope_store(q, k, RANK, slots, cache, positions, cos_sin)
        want_q = torch.cat([q_in[..., :RANK], rotate(q_in[..., RANK:], positions, cos_sin)], -1)
        want_k = torch.cat([k[:, 0, :RANK], rotate(k[..., RANK:], positions, cos_sin)[:, 0]], -1)
    else:
        mla_rope_store(q, k, RANK, slots, cache)
        want_q, want_k = q_in, k[:, 0]
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    got = cache.view(-1, RANK + ROPE)[slots]
    torch.testing.assert_close(got, want_k, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(cache.shape[0] * 16, dtype=torch.bool)
    untouched[slots] = False
    assert cache.view(-1, RANK + ROPE)[untouched].isnan().all()


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_backend_matches_reference_on_a_mixed_step(page_size):
    """Decodes and prefill chunks in one step, fused rotary: the two MLA backends agree."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    H, max_pos = 6, 128
    config = MLAConfig.create(H, RANK, ROPE, 0.15)
    spec = LatentSpec(RANK, ROPE)
    layout = spec.make_layout("nhd", page_size, "float32")
    q_lens, prefix_lens = [1, 1, 12, 5], [30, 7, 0, 19]
    pages_each = [-(-(p + n) // page_size) for p, n in zip(prefix_lens, q_lens, strict=True)]
    num_pages = sum(pages_each) + 2
    tables, nxt = [], 1
    for n in pages_each:
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    batch = ForwardBatch.build(q_lens, prefix_lens, tables, layout.page_size,
                               torch.device("cpu"), num_decodes=2)
    T = sum(q_lens)
    cos_sin = torch.randn(max_pos, ROPE, generator=gen)
    outs = []
    prefix_rows = torch.randn(num_pages, page_size, RANK + ROPE, generator=gen)
    q = torch.randn(T, H, RANK + ROPE, generator=gen)
    k = torch.randn(T, 1, RANK + ROPE, generator=gen)
    for cls in (MLAReferenceBackend, MLATritonBackend):
        pool = spec.build_pool(layout, 1, num_pages, torch.float32, torch.device("cpu"))
        pool.caches[0].copy_(prefix_rows)  # the cached prefixes
        backend = cls(config, pool)
        backend.plan(batch)
        rope = RopeInputs(batch.positions, cos_sin)
        outs.append((backend.attend(q.clone(), k.clone(), k[..., :RANK], 0, rope),
                     pool.caches[0].clone()))
    (ref_out, ref_cache), (tri_out, tri_cache) = outs
    torch.testing.assert_close(tri_out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tri_cache, ref_cache, rtol=1e-6, atol=1e-6)


def test_tiny_deepseek_through_the_triton_backend_matches_transformers(tmp_path):
    """Teacher-forced logits of a tiny random DeepSeek-V3 served by the Triton MLA kernels
    (fused rotary store, decode splits, extend) within 1e-4 relative of transformers'."""
    from attention.registry import create_backend
    from model.families import attention_config_for
    from model.loader import load_model
    from tests.model.deepseek_tiny import save_tiny
    from tests.model.hf_reference import PagedRunner, hf_logits

    hf = save_tiny("v3", tmp_path, random.randrange(2**31))
    model = load_model(str(tmp_path), torch.float32, torch.device("cpu"),
                       with_tokenizer=False).model
    runner = PagedRunner(model, "nhd", 16)
    runner.backend = create_backend("triton", attention_config_for(model.config), runner.pool)
    assert isinstance(runner.backend, MLATritonBackend)
    runner.backend.min_tokens_per_split = 8  # several splits for these short decodes
    rng = random.Random()
    seqs = {s: [rng.randrange(model.config.vocab_size) for _ in range(n)]
            for s, n in enumerate([30, 21])}
    got = {s: [] for s in seqs}
    for step in ({0: (0, 18), 1: (0, 20)}, {0: (18, 19), 1: (20, 21)}, {0: (19, 30)}):
        for s, logits in runner.step({s: seqs[s][a:b] for s, (a, b) in step.items()}).items():
            got[s].append(logits)
    for s, ids in seqs.items():
        ref = hf_logits(hf, ids)
        rel = ((torch.cat(got[s]) - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, rel
