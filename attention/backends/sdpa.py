"""torch SDPA as a peer backend: gather the paged K/V into a padded block (FP8 pages
dequantized into q's dtype on the way), then `scaled_dot_product_attention` with a boolean
(or ALiBi float) mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.backends.reference import ReferenceBackend, _GroupPlan
from attention.base import AttentionConfig, BackendCapabilities
from attention.variants import alibi_slopes, variants_of_peer
from kvcache.layout import LAYOUT_NAMES
from kvcache.pool import KVPool


def sdpa_group(
    plan: _GroupPlan, q: torch.Tensor, pool: KVPool, layer: int, config: AttentionConfig,
) -> torch.Tensor:
    B, Lq = plan.q_rows.shape
    Hq, D = config.num_q_heads, config.head_dim
    qg = q[plan.q_rows].transpose(1, 2)  # [B, Hq, Lq, D]
    keys, vals = pool.gather(layer, plan.kv_slots, q.dtype)
    keys, vals = keys.transpose(1, 2), vals.transpose(1, 2)  # [B, Hkv, Lk, D]
    mask: torch.Tensor = plan.visible  # [B, 1, Lq, Lk]
    variant = config.variant
    if variant.window is not None:
        mask = mask & ((plan.q_pos - plan.k_pos) < variant.window)
    if variant.needs_slopes:
        slopes = alibi_slopes(Hq).to(q.device, torch.float32).view(1, Hq, 1, 1)
        bias = slopes * (plan.k_pos - plan.q_pos).float()
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(
        qg, keys, vals, attn_mask=mask, scale=config.scale, enable_gqa=True
    )
    # Fully masked padding rows come back as NaN; they are dropped by q_valid anyway.
    return out.transpose(1, 2).reshape(B, Lq, Hq, D)


class SDPABackend(ReferenceBackend):
    name = "sdpa"
    capabilities = BackendCapabilities(fused_rope_store=False, cuda_graphs=False)
    supported_layouts = frozenset(LAYOUT_NAMES)
    supported_variants = variants_of_peer("sdpa")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        self.pool.store(layer, k, v, self.batch.slot_mapping)
        out = torch.empty_like(q)
        for g in self.groups:
            o = sdpa_group(g, q[g.token_offset : g.token_offset + g.num_tokens], self.pool,
                           layer, self.config)
            out[g.token_offset : g.token_offset + g.num_tokens] = o[g.q_valid]
        return out
