"""ForwardBatch: the one batch description every attention backend reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A step's ragged batch. Sequences are ordered decodes first, then prefill chunks.

    Device tensors (int32 unless noted):
      positions [T] int64: absolute position of each new token
      qo_indptr [B+1]: new tokens of sequence i are rows qo_indptr[i]:qo_indptr[i+1]
      seq_lens [B]: KV length after this step (cached prefix + new tokens)
      prefix_lens [B]: KV tokens already cached before this step
      block_table [B, max_pages]: page ids (page size 1: the request-to-token table);
                                  unused entries point at the scratch page 0
      slot_mapping [T] int64: where each new token's K/V is stored
      state_slots [B]: hybrid models only, each sequence's linear-attention state slot
      snapshot_slots [B, S]: hybrid models only, where each sequence's state snapshots go
                             (kvcache/state_pool.py; -1: none)
    Host copies (python lists) are kept for planning, so `plan` never syncs the device.
    """

    positions: torch.Tensor
    qo_indptr: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    qo_indptr_host: list[int]
    seq_lens_host: list[int]
    num_decodes: int  # the first `num_decodes` sequences have exactly one new token
    page_size: int
    state_slots: torch.Tensor | None = None
    snapshot_slots: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return self.qo_indptr_host[-1]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    @property
    def phase(self) -> str:
        """'decode', 'prefill' or 'mixed' (for metrics labels)."""
        if self.num_prefills == 0:
            return "decode"
        return "prefill" if self.num_decodes == 0 else "mixed"

    @property
    def prefix_lens_host(self) -> list[int]:
        p = self.qo_indptr_host
        return [n - (p[i + 1] - p[i]) for i, n in enumerate(self.seq_lens_host)]

    @property
    def max_q_len(self) -> int:
        p = self.qo_indptr_host
        return max((p[i + 1] - p[i] for i in range(self.num_seqs)), default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        prefix_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
        num_decodes: int | None = None,
        state_slots: list[int] | None = None,
        snapshot_slots: list[list[int]] | None = None,
    ) -> ForwardBatch:
        """Build from host lists in one pinned buffer copy per tensor."""
        if num_decodes is None:
            num_decodes = 0
            for n in q_lens:
                if n != 1:
                    break
                num_decodes += 1
        seq_lens = [p + q for p, q in zip(prefix_lens, q_lens, strict=True)]
        indptr = [0]
        for n in q_lens:
            indptr.append(indptr[-1] + n)
        positions: list[int] = []
        slots: list[int] = []
        for pre, n, pages in zip(prefix_lens, q_lens, page_tables, strict=True):
            for pos in range(pre, pre + n):
                positions.append(pos)
                slots.append(pages[pos // page_size] * page_size + pos % page_size)
        max_pages = max((len(p) for p in page_tables), default=1) or 1
        table = [pages + [0] * (max_pages - len(pages)) for pages in page_tables]
        pin = device.type == "cuda"

        def to_dev(data: list, dtype: torch.dtype) -> torch.Tensor:
            t = torch.tensor(data, dtype=dtype)
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return cls(
            positions=to_dev(positions, torch.int64),
            qo_indptr=to_dev(indptr, torch.int32),
            seq_lens=to_dev(seq_lens, torch.int32),
            prefix_lens=to_dev(prefix_lens, torch.int32),
            block_table=to_dev(table, torch.int32).view(len(page_tables), max_pages),
            slot_mapping=to_dev(slots, torch.int64),
            qo_indptr_host=indptr,
            seq_lens_host=seq_lens,
            num_decodes=num_decodes,
            page_size=page_size,
            state_slots=to_dev(state_slots, torch.int32) if state_slots is not None else None,
            snapshot_slots=_snapshot_table(snapshot_slots, to_dev),
        )


def _snapshot_table(rows: list[list[int]] | None, to_dev) -> torch.Tensor | None:  # noqa: ANN001
    """[B, widest row] int32, padded with -1; None when no row has a snapshot."""
    if rows is None or not any(rows):
        return None
    width = max(len(r) for r in rows)
    table = [r + [-1] * (width - len(r)) for r in rows]
    return to_dev(table, torch.int32).view(len(rows), width)
