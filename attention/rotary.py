"""Rotary position embedding in torch, on the cos|sin cache format the backends share.

The cache is float32 [max_positions, head_dim]: columns [0, D/2) hold cos and [D/2, D)
sin of position * inv_freq. Rotation follows the neox / Hugging Face "rotate_half"
convention: with x = (x1 | x2), rot(x) = (x1 * cos - x2 * sin | x2 * cos + x1 * sin).
The model rotates with these when its backend does not fuse rotary into the K/V store;
a fused backend's kernel must produce the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RotaryTables:
    """Per-step tables for a set of positions, shared by every layer of the step."""

    cos: torch.Tensor  # [T, 1, D] float32: (cos | cos)
    sin: torch.Tensor  # [T, 1, D] float32: (-sin | sin)


def rotary_tables(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> RotaryTables:
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions]  # [T, D]
    cos, sin = cos_sin[:, :half], cos_sin[:, half:]
    return RotaryTables(
        cos=torch.cat([cos, cos], dim=-1)[:, None, :],
        sin=torch.cat([-sin, sin], dim=-1)[:, None, :],
    )


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Rotate x [T, H, D], computing in float32 (float64 stays float64)."""
    T, H, D = x.shape
    xf = x.float() if x.dtype != torch.float64 else x
    # (x2 | x1): the halves swapped; tables.sin carries the sign of rotate_half.
    swapped = xf.reshape(T, H, 2, D // 2).flip(2).reshape(T, H, D)
    return torch.addcmul(xf * tables.cos, swapped, tables.sin).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] at absolute `positions` [T]."""
    return apply_rotary(x, rotary_tables(cos_sin_cache, positions))
