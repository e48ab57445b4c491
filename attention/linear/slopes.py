"""MiniMax's per-head decay rates (transformers' `MiniMaxLightningAttention.get_slope_rate`)."""

from __future__ import annotations

import torch


def slopes_for_layer(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """[num_heads] float32 decay rates lam_h of one layer: the state decays by exp(-lam_h) a token.

    ALiBi's geometric series 2^(-8 h / H) (h = 1..H), scaled down linearly with depth so the
    last layer decays least. The float operations run in the same order and dtype as
    transformers' so the values agree bit for bit.
    """
    if num_heads < 1 or num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(f"bad slope arguments: num_heads={num_heads}, layer_idx={layer_idx}, "
                         f"num_layers={num_layers}")
    base = 1 / (2 ** (8 / num_heads))
    depth_factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    rates = base ** (torch.arange(num_heads) + 1)
    return (rates * depth_factor).to(torch.float32)
