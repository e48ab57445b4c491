"""Logits-transform variants: what happens to q.k before (or instead of) softmax.

A `Variant` is chosen at server start and never carried by requests. The torch definitions
here are the oracle; `attention/triton/variants.py` holds the same transforms as Triton
jitted functions, one kernel instance per variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BUILTIN_VARIANTS = ("softmax", "softcap", "sliding_window", "alibi", "sigmoid", "silu")


@dataclass(frozen=True)
class Variant:
    """name: a built-in name or 'module:function' (a user's Triton transform).

    softcap: logits -> cap * tanh(logits / cap)             (param = cap, default 30)
    sliding_window: keys older than `window` positions are masked  (param = window)
    alibi: logits + slope_h * (k_pos - q_pos)                (slopes from the head count)
    sigmoid: no softmax; weights = sigmoid(logits)           (HSTU/SigLIP-style pointwise)
    silu: no softmax; weights = silu(logits) / n_keys_visible (HSTU-style pointwise)
    """

    name: str = "softmax"
    param: float = 0.0

    @property
    def use_softmax(self) -> bool:
        return self.name not in ("sigmoid", "silu")

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTIN_VARIANTS

    def __str__(self) -> str:
        return self.name if not self.param else f"{self.name}({self.param:g})"


def parse_variant(spec: str) -> Variant:
    """'softmax', 'softcap:30', 'sliding_window:256', 'alibi', 'sigmoid', 'silu', or a
    user's 'package.module:function' (not a built-in name)."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    if name in BUILTIN_VARIANTS:
        if name == "softcap":
            return Variant("softcap", float(arg) if arg else 30.0)
        if name == "sliding_window":
            if not arg:
                raise ValueError("sliding_window needs a window: sliding_window:W")
            return Variant("sliding_window", float(int(arg)))
        if arg:
            raise ValueError(f"variant {name!r} takes no parameter")
        return Variant(name)
    if arg and name:
        return Variant(spec)  # a user's Triton transform, resolved by the triton backend
    raise ValueError(f"unknown attention variant {spec!r}; built-ins: {', '.join(BUILTIN_VARIANTS)}")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi head slopes (Press et al.), with the usual interpolation for non powers of 2."""

    def pow2_slopes(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = pow2_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2_slopes(closest) + pow2_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def apply_variant_torch(
    variant: Variant,
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """Attention weights from scaled scores.

    scores: [..., Hq, Lq, Lk] (already multiplied by the softmax scale)
    q_pos: [..., 1, Lq, 1] and k_pos: [..., 1, 1, Lk] absolute positions
    visible: bool, broadcastable to scores: the causal / padding mask
    Returns weights of scores' shape. A softmax row with no visible key (only padding
    queries have none) is NaN; callers drop those rows.
    """
    if not variant.is_builtin:
        raise ValueError(f"the torch oracle has no definition for user variant {variant.name!r}")
    hq = scores.shape[-3]
    if variant.name == "softcap":
        scores = variant.param * torch.tanh(scores / variant.param)
    elif variant.name == "alibi":
        slopes = alibi_slopes(hq).to(scores.device, scores.dtype).view(hq, 1, 1)
        scores = scores + slopes * (k_pos - q_pos).to(scores.dtype)
    elif variant.name == "sliding_window":
        visible = visible & ((q_pos - k_pos) < int(variant.param))
    if variant.use_softmax:
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, dim=-1)
    if variant.name == "sigmoid":
        weights = torch.sigmoid(scores)
        return weights.masked_fill(~visible, 0.0)
    # silu: normalised by the number of keys each query may see
    weights = torch.nn.functional.silu(scores).masked_fill(~visible, 0.0)
    n_visible = visible.expand_as(weights).sum(-1, keepdim=True).clamp(min=1)
    return weights / n_visible.to(weights.dtype)
