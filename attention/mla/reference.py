"""The plain-torch MLA backend: the oracle of the MLA kernels, and the CPU default.

Each phase group (decodes, prefill chunks) gathers its requests' latent rows through the
block table into one padded [B, Lk, rank + rope] block (the same index plan as the K/V
reference backend) and attends with batched matmuls: every head against the shared rows.
"""

from __future__ import annotations

import torch

from attention.backends.reference import _GroupPlan, plan_phase_groups
from attention.base import BackendCapabilities
from attention.batch import ForwardBatch
from attention.mla.base import MLABackend, MLAConfig
from kvcache.latent_pool import LatentPool


def mla_attend_group(plan: _GroupPlan, q: torch.Tensor, rows: torch.Tensor,
                     config: MLAConfig, compute_dtype: torch.dtype) -> torch.Tensor:
    """q [T, H, rank + rope] of one group, rows [B, Lk, rank + rope] -> [B, Lq, H, rank]."""
    B, Lq = plan.q_rows.shape
    H, r = config.num_q_heads, config.kv_lora_rank
    qg = q[plan.q_rows].to(compute_dtype).reshape(B, Lq * H, -1)  # rows: (query, head)
    kv = rows.to(compute_dtype)
    scores = torch.matmul(qg, kv.transpose(1, 2)).view(B, Lq, H, -1) * config.scale
    visible = plan.visible[:, 0, :, None, :]  # [B, Lq, 1, Lk]
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded query rows: all masked
    out = torch.matmul(weights.view(B, Lq * H, -1), kv[..., :r])
    return out.view(B, Lq, H, r)


class MLAReferenceBackend(MLABackend):
    name = "reference"
    capabilities = BackendCapabilities(fused_rope_store=False, cuda_graphs=False)

    def __init__(self, config: MLAConfig, pool: LatentPool) -> None:
        super().__init__(config, pool)
        self.groups: list[_GroupPlan] = []

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self.groups = plan_phase_groups(batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        self.pool.store(layer, k[:, 0], self.batch.slot_mapping)
        r = self.config.kv_lora_rank
        out = q.new_empty(q.shape[0], q.shape[1], r)
        compute_dtype = torch.float32 if q.dtype != torch.float64 else torch.float64
        for g in self.groups:
            T = g.num_tokens
            rows = self.pool.read(layer, g.kv_slots)
            o = mla_attend_group(g, q[g.token_offset : g.token_offset + T], rows, self.config,
                                 compute_dtype)
            out[g.token_offset : g.token_offset + T] = o[g.q_valid].to(q.dtype)
        return out
