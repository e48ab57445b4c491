"""A guard on the CPU default path: a decode step's attention over a long cached prefix
allocates what its arithmetic needs (scores and weights, a few floats per query head and
key), never a copy of the prefix's K/V (2 x kv_heads x head_dim floats per key), whatever
the prefix length. Memory, not time: exact on a loaded machine."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from attention import AttentionConfig, ForwardBatch
from attention.registry import create_backend, default_backend
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig

HQ, HKV, D, P = 9, 3, 64, 16  # SmolLM2-135M's attention
BATCH = 8  # decodes: four pairs sharing a cached prefix (a system prompt), all in one step
# Bytes the attention arithmetic may allocate per (sequence, query head, cached key): 4x the
# float32 scores themselves (the paged backend allocates 8: scores, weights in place, and
# one more buffer of that size); the reference backend's gather allocates 800 (a [B, L] K/V
# copy, its re-layout and the score buffers of the padded block).
ARITHMETIC_BYTES = 4 * 4
COPY_BYTES = 2 * HKV * D * 4  # what gathering K and V costs per (sequence, key)


def _allocated_bytes(prefix_len: int) -> int:
    layout = KVLayout.create("nhd", P, HKV, D, "float32")
    pages_per_seq = prefix_len // P + 1
    pool = KVPool(KVPoolConfig(layout, 1, 2 + BATCH * pages_per_seq, torch.float32,
                               torch.device("cpu")))
    for t in pool.k_caches + pool.v_caches:
        t.normal_()
    backend = create_backend(default_backend("cpu", "nhd"), AttentionConfig(HQ, HKV, D, D**-0.5),
                             pool)
    tables = []
    for i in range(BATCH):
        owner = (i // 2) * 2  # seq 2j+1 shares seq 2j's prefix pages, as the prefix cache does
        first = 1 + owner * pages_per_seq
        shared = list(range(first, first + prefix_len // P))
        tables.append(shared + [1 + (i + 1) * pages_per_seq - 1])
    batch = ForwardBatch.build([1] * BATCH, [prefix_len] * BATCH, tables, P, torch.device("cpu"))
    backend.plan(batch)
    q, k, v = torch.randn(BATCH, HQ, D), torch.randn(BATCH, HKV, D), torch.randn(BATCH, HKV, D)
    backend.forward(q, k, v, 0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backend.forward(q, k, v, 0)
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_cached_prefix_is_not_copied_per_layer() -> None:
    short, long = 256, 2048
    grown = _allocated_bytes(long) - _allocated_bytes(short)
    arithmetic = BATCH * HQ * (long - short) * ARITHMETIC_BYTES
    # a per-layer copy of the prefix would grow by BATCH x COPY_BYTES per key, 24x the bound
    assert grown <= arithmetic, (grown, arithmetic, BATCH * (long - short) * COPY_BYTES)
