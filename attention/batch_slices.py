"""Splitting a ForwardBatch by sequence, for hybrid backends and per-phase kernels."""

from __future__ import annotations

from attention.batch import ForwardBatch


def slice_batch(batch: ForwardBatch, start: int, end: int) -> ForwardBatch:
    """Sequences [start, end) of `batch` as a batch of their own (tokens re-based to 0)."""
    t0, t1 = batch.qo_indptr_host[start], batch.qo_indptr_host[end]
    indptr = [p - t0 for p in batch.qo_indptr_host[start : end + 1]]
    num_decodes = max(0, min(batch.num_decodes, end) - start)
    return ForwardBatch(
        positions=batch.positions[t0:t1],
        qo_indptr=batch.qo_indptr[start : end + 1] - t0,
        seq_lens=batch.seq_lens[start:end],
        prefix_lens=batch.prefix_lens[start:end],
        block_table=batch.block_table[start:end],
        slot_mapping=batch.slot_mapping[t0:t1],
        qo_indptr_host=indptr,
        seq_lens_host=batch.seq_lens_host[start:end],
        num_decodes=num_decodes,
        page_size=batch.page_size,
    )


def split_phases(batch: ForwardBatch) -> tuple[ForwardBatch | None, ForwardBatch | None]:
    """(decode part, prefill part); either may be None when empty."""
    n, d = batch.num_seqs, batch.num_decodes
    decode = slice_batch(batch, 0, d) if d > 0 else None
    prefill = slice_batch(batch, d, n) if d < n else None
    return decode, prefill
