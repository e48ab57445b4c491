"""The torch lightning-attention reference vs a token-by-token float64 recurrence, and the
decay rates vs transformers' own MiniMax layer."""

from __future__ import annotations

import pytest
import torch

from attention.linear import (
    lightning_decode_reference,
    lightning_extend_reference,
    slopes_for_layer,
)
from tests.attention.linear_oracle import check_extend, random_case, recurrence


@pytest.mark.parametrize("dtype,state_dtype,tol", [
    (torch.float64, torch.float64, 1e-10),
    (torch.float32, torch.float32, 2e-4),
])
def test_extend_reference_matches_recurrence(dtype, state_dtype, tol):
    # lengths 1 and not multiples of the 64-token segments, prefixes inside segments
    case = random_case([1, 70, 64, 129, 5], [0, 3, 64, 100, 0], H=3, D=8, seed=1)
    check_extend(lightning_extend_reference, case, dtype, 0, tol, state_dtype)


@pytest.mark.parametrize("every", [4, 64])
def test_extend_reference_snapshots(every):
    # every=4 cuts inside the reference's segments; 64 on their edges
    case = random_case([9, 130, 2, 4, 70], [3, 8, 5, 0, 60], H=2, D=4, seed=2)
    check_extend(lightning_extend_reference, case, torch.float64, every, 1e-10, torch.float64)


def test_decode_reference_matches_recurrence():
    case = random_case([1, 1, 1], [5, 0, 9], H=2, D=8, seed=3)
    want, finals, _ = recurrence(case)
    states = torch.full((6, 2, 8, 8), float("nan"), dtype=torch.float64)
    slots = torch.tensor([4, 1, 2], dtype=torch.int32)
    states[slots.long()] = case.init
    out = lightning_decode_reference(case.q, case.k, case.v, case.slopes, states, slots)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(states[slots.long()], torch.stack(finals))
    assert torch.isnan(states[[0, 3, 5]]).all()


@pytest.mark.parametrize("num_heads,num_layers", [(4, 3), (64, 80), (6, 1)])
def test_slopes_match_transformers(num_heads, num_layers):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = MiniMaxConfig(hidden_size=num_heads * 4, num_attention_heads=num_heads,
                           num_key_value_heads=num_heads, head_dim=4,
                           num_hidden_layers=num_layers, block_size=8,
                           layer_types=["linear_attention"] * num_layers)
    for layer in sorted({0, num_layers // 2, num_layers - 1}):
        theirs = MiniMaxLightningAttention(config, layer).get_slope_rate().flatten()
        ours = slopes_for_layer(num_heads, layer, num_layers)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs.to(torch.float32))
