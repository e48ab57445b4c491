"""The plain-torch reference backend: the oracle, and the CPU default.

Batched, not a per-request loop: each phase group (decodes, prefill chunks) is gathered into
one padded [B, L, H, D] block through the block table and attended with batched matmuls.
FP8 pages are dequantized as they are gathered (`KVPool.gather`), then attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention.base import AttentionBackend, AttentionConfig, BackendCapabilities
from attention.batch import ForwardBatch
from attention.batch_slices import split_phases
from attention.variants import BUILTIN_VARIANTS, apply_variant_torch
from kvcache.layout import LAYOUT_NAMES
from kvcache.pool import KVPool


@dataclass
class _GroupPlan:
    """Padded index tensors for one group of sequences (all decodes or all prefills)."""

    token_offset: int  # first new-token row of this group in the step's q
    num_tokens: int  # new tokens in this group
    q_rows: torch.Tensor  # [B, Lq] row of q for each padded query (clamped)
    q_valid: torch.Tensor  # [B, Lq] bool
    # [B, Lk] slot of each key. Padding keys point at the sequence's first token, which
    # holds finite values: masked to weight 0, they add exactly 0 (a NaN-poisoned or
    # garbage scratch page could not), and no per-layer masking of K/V is needed.
    kv_slots: torch.Tensor
    visible: torch.Tensor  # [B, 1, Lq, Lk] causal & padding mask
    q_pos: torch.Tensor  # [B, 1, Lq, 1]
    k_pos: torch.Tensor  # [B, 1, 1, Lk]


def plan_group(batch: ForwardBatch, token_offset: int) -> _GroupPlan:
    dev = batch.block_table.device
    B = batch.num_seqs
    Lq = max(batch.max_q_len, 1)
    Lk = max(batch.max_seq_len, 1)
    P = batch.page_size
    q_lens = (batch.qo_indptr[1:] - batch.qo_indptr[:-1]).long()
    i = torch.arange(Lq, device=dev)
    j = torch.arange(Lk, device=dev)
    q_valid = i[None, :] < q_lens[:, None]
    q_rows = (batch.qo_indptr[:-1].long()[:, None] + i[None, :]).clamp(max=max(batch.num_tokens - 1, 0))
    k_valid = j[None, :] < batch.seq_lens.long()[:, None]
    pages = batch.block_table.long().gather(1, (j // P).clamp(max=batch.block_table.shape[1] - 1)
                                            .expand(B, Lk))
    kv_slots = torch.where(k_valid, pages * P + (j % P)[None, :], pages[:, :1] * P)
    q_pos = batch.prefix_lens.long()[:, None] + i[None, :]  # [B, Lq]
    visible = (j[None, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :] & q_valid[:, :, None]
    return _GroupPlan(
        token_offset=token_offset,
        num_tokens=batch.num_tokens,
        q_rows=q_rows,
        q_valid=q_valid,
        kv_slots=kv_slots,
        visible=visible[:, None],
        q_pos=q_pos[:, None, :, None],
        k_pos=j.view(1, 1, 1, Lk),
    )


def attend_group(
    plan: _GroupPlan,
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    config: AttentionConfig,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Attention for one group over `layer`'s pages -> [B, Lq, Hq, D] in compute_dtype."""
    B, Lq = plan.q_rows.shape
    Hq, Hkv, D = config.num_q_heads, config.num_kv_heads, config.head_dim
    G = Hq // Hkv
    qg = q[plan.q_rows].to(compute_dtype)  # [B, Lq, Hq, D]
    keys, vals = pool.gather(layer, plan.kv_slots, compute_dtype)  # [B, Lk, Hkv, D] each
    Lk = keys.shape[1]
    # GQA: the G query heads of a KV head become extra query rows of one matmul.
    qg = qg.view(B, Lq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Lq, D)
    kt = keys.permute(0, 2, 3, 1)  # [B, Hkv, D, Lk]
    scores = torch.matmul(qg, kt).view(B, Hq, Lq, Lk) * config.scale
    weights = apply_variant_torch(config.variant, scores, plan.q_pos, plan.k_pos, plan.visible)
    out = torch.matmul(weights.view(B, Hkv, G * Lq, Lk), vals.permute(0, 2, 1, 3))
    return out.view(B, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(B, Lq, Hq, D)


def plan_phase_groups(batch: ForwardBatch) -> list[_GroupPlan]:
    """The padded plans of a batch's decode part and prefill part (each if present): the two
    attend apart, so a decode row is never padded to a prompt chunk's length."""
    groups = []
    decode, prefill = split_phases(batch)
    if decode is not None:
        groups.append(plan_group(decode, 0))
    if prefill is not None:
        groups.append(plan_group(prefill, batch.qo_indptr_host[batch.num_decodes]))
    return groups


class ReferenceBackend(AttentionBackend):
    name = "reference"
    capabilities = BackendCapabilities(fused_rope_store=False, cuda_graphs=False)
    supported_layouts = frozenset(LAYOUT_NAMES)
    supported_variants = frozenset(BUILTIN_VARIANTS)

    def __init__(self, config: AttentionConfig, pool: KVPool) -> None:
        super().__init__(config, pool)
        self.groups: list[_GroupPlan] = []

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self.groups = plan_phase_groups(batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        self.pool.store(layer, k, v, self.batch.slot_mapping)
        out = torch.empty_like(q)
        compute_dtype = torch.float32 if q.dtype != torch.float64 else torch.float64
        for g in self.groups:
            T = g.num_tokens
            qs = q[g.token_offset : g.token_offset + T]
            o = attend_group(g, qs, self.pool, layer, self.config, compute_dtype)
            out[g.token_offset : g.token_offset + T] = o[g.q_valid].to(q.dtype)
        return out
