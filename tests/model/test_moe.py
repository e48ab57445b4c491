"""The MoE block's grouped expert path (torch's grouped GEMM, and the per-expert fallback)
against a per-token float64 oracle, with empty experts and repeated tokens."""

from __future__ import annotations

import random

import pytest
import torch

from model.deepseek_config import DeepseekConfig
from model.moe import HAS_GROUPED_MM, RoutedExperts


def _config(num_experts: int, top_k: int) -> DeepseekConfig:
    return DeepseekConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=2,
                          num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                          v_head_dim=4, moe_intermediate_size=16, n_routed_experts=num_experts,
                          num_experts_per_tok=top_k)


@pytest.mark.parametrize("grouped", [False, True] if HAS_GROUPED_MM else [False])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_routed_experts_match_per_token_oracle(grouped, tokens):
    E, k = 6, 2
    dtype = torch.float32 if grouped else torch.float64  # torch's grouped GEMM: no float64
    experts = RoutedExperts(_config(E, k), dtype).requires_grad_(False)
    experts.use_grouped_mm = grouped
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    x = torch.randn(tokens, 24, dtype=dtype)
    # expert 4 never chosen: an empty block
    ids = torch.tensor([random.sample([0, 1, 2, 3, 5], k) for _ in range(tokens)])
    weights = torch.rand(tokens, k, dtype=torch.float32)
    got = experts(x, weights, ids)
    assert experts._grouped_mm_for(x) == grouped
    w_gate_up, w_down, x = (t.double() for t in (experts.gate_up_proj, experts.down_proj, x))
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (w_gate_up[e] @ x[t]).split(16)
            h = torch.nn.functional.silu(gate) * up
            want[t] += float(weights[t, j]) * (w_down[e] @ h)
    tol = 1e-4 if grouped else 1e-9
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
