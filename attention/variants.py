"""Logits-transform variants: what happens to q.k before (or instead of) softmax.

A `Variant` is chosen at server start and never carried by requests. The torch definitions
here are the oracle; `attention/triton/variants.py` holds the same transforms as Triton
jitted functions, one kernel instance per variant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VariantSpec:
    """What a built-in variant is; every backend and kernel reads these fields."""

    name: str
    uses_softmax: bool = True
    param: str | None = None  # what the parameter is ("cap", "window"); None: it takes none
    default_param: float | None = None  # with a param: None means the user must give one
    modifies_logits: bool = False  # transforms or masks q.k before the softmax
    needs_slopes: bool = False  # per-head ALiBi slopes
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None  # pointwise weights (no softmax)
    normalize_by_visible: bool = False  # weights divided by the keys the query may see
    peers: frozenset[str] = frozenset()  # torch peer backends that express it (reference: all)


_SPECS = (
    VariantSpec("softmax", peers=frozenset({"sdpa", "flex"})),
    VariantSpec("softcap", param="cap", default_param=30.0, modifies_logits=True,
                peers=frozenset({"flex"})),
    VariantSpec("sliding_window", param="window", modifies_logits=True,
                peers=frozenset({"sdpa", "flex"})),
    VariantSpec("alibi", modifies_logits=True, needs_slopes=True,
                peers=frozenset({"sdpa", "flex"})),
    VariantSpec("sigmoid", uses_softmax=False, weight=torch.sigmoid),
    VariantSpec("silu", uses_softmax=False, weight=torch.nn.functional.silu,
                normalize_by_visible=True),
)
VARIANT_SPECS = {spec.name: spec for spec in _SPECS}
BUILTIN_VARIANTS = tuple(VARIANT_SPECS)


def variants_of_peer(peer: str) -> frozenset[str]:
    """The built-in variants that the torch peer backend `peer` ('sdpa', 'flex') expresses."""
    return frozenset(spec.name for spec in _SPECS if peer in spec.peers)


@dataclass(frozen=True)
class Variant:
    """name: a built-in name or 'module:function' (a user's Triton transform).

    softcap: logits -> cap * tanh(logits / cap)             (param = cap, default 30)
    sliding_window: keys `window` or more positions back are masked  (param = window)
    alibi: logits + slope_h * (k_pos - q_pos)                (slopes from the head count)
    sigmoid: no softmax; weights = sigmoid(logits)           (HSTU/SigLIP-style pointwise)
    silu: no softmax; weights = silu(logits) / n_keys_visible (HSTU-style pointwise)

    A user variant is a logits transform under softmax, with `param` passed to it.
    """

    name: str = "softmax"
    param: float = 0.0

    def __post_init__(self) -> None:
        spec = self.spec
        if spec is None or spec.param is None:
            return
        if self.param <= 0:
            raise ValueError(f"variant {self.name!r} needs a positive {spec.param}")
        if spec.param == "window" and not float(self.param).is_integer():
            raise ValueError(f"the sliding window is a whole number of keys, got {self.param}")

    @property
    def spec(self) -> VariantSpec | None:
        """The built-in's table entry; None for a user's transform."""
        return VARIANT_SPECS.get(self.name)

    @property
    def is_builtin(self) -> bool:
        return self.spec is not None

    @property
    def uses_softmax(self) -> bool:
        spec = self.spec
        return spec is None or spec.uses_softmax

    @property
    def modifies_logits(self) -> bool:
        spec = self.spec
        return spec is None or spec.modifies_logits

    @property
    def needs_slopes(self) -> bool:
        spec = self.spec
        return spec is not None and spec.needs_slopes

    @property
    def normalize_by_visible(self) -> bool:
        spec = self.spec
        return spec is not None and spec.normalize_by_visible

    @property
    def softcap(self) -> float | None:
        """The cap of a softcap variant, else None."""
        return self._param_if("cap")

    @property
    def window(self) -> int | None:
        """A sliding window's size: keys at q_pos - k_pos >= window are masked; else None."""
        window = self._param_if("window")
        return None if window is None else int(window)

    def _param_if(self, kind: str) -> float | None:
        spec = self.spec
        return float(self.param) if spec is not None and spec.param == kind else None

    def __str__(self) -> str:
        return self.name if not self.param else f"{self.name}({self.param:g})"


def parse_variant(spec: str) -> Variant:
    """'softmax', 'softcap:30', 'sliding_window:256', 'alibi', 'sigmoid', 'silu', or a
    user's 'package.module:function' (not a built-in name)."""
    spec = spec.strip()
    name, _, arg = spec.partition(":")
    builtin = VARIANT_SPECS.get(name)
    if builtin is not None:
        if builtin.param is None:
            if arg:
                raise ValueError(f"variant {name!r} takes no parameter")
            return Variant(name)
        if not arg:
            if builtin.default_param is None:
                raise ValueError(f"{name} needs a {builtin.param}: {name}:{builtin.param.upper()}")
            return Variant(name, builtin.default_param)
        return Variant(name, float(arg))
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
    spec = variant.spec
    if spec is None:
        raise ValueError(f"the torch oracle has no definition for user variant {variant.name!r}")
    hq = scores.shape[-3]
    if variant.softcap is not None:
        scores = variant.softcap * torch.tanh(scores / variant.softcap)
    if variant.needs_slopes:
        slopes = alibi_slopes(hq).to(scores.device, scores.dtype).view(hq, 1, 1)
        scores = scores + slopes * (k_pos - q_pos).to(scores.dtype)
    if variant.window is not None:
        visible = visible & ((q_pos - k_pos) < variant.window)
    if spec.uses_softmax:
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, dim=-1)
    assert spec.weight is not None
    weights = spec.weight(scores).masked_fill(~visible, 0.0)
    if spec.normalize_by_visible:  # by the number of keys each query may see
        n_visible = visible.expand_as(weights).sum(-1, keepdim=True).clamp(min=1)
        weights = weights / n_visible.to(weights.dtype)
    return weights
