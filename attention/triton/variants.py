"""Logits-transform variants as Triton jitted functions, one kernel instance per variant.

Every transform has the same signature and is passed to a kernel as a `tl.constexpr`
argument, so each variant compiles to its own kernel instance (no run-time branching):

    @triton.jit
    def fn(s, q_pos, k_pos, slope, param):
        # s      [M, N] float32: q.k already multiplied by the softmax scale
        # q_pos  [M, 1] int32:   absolute position of each query row
        # k_pos  [1, N] int32:   absolute position of each key column
        # slope  [M, 1] float32: the ALiBi slope of each row's query head
        #                        (attention.variants.alibi_slopes; zeros unless needed)
        # param  float32 scalar: the variant's parameter (softcap cap, window size)
        return s2  # [M, N] float32

A variant is a pair of such functions:
  - `logits`: transforms scores before the kernel applies the causal / padding mask.
    Returning -inf masks a key (sliding_window does this).
  - `weight`: only for variants without softmax: the pointwise weight of a visible key
    (sigmoid, silu). For softmax variants it is `identity` and unused.
`normalize_by_visible` divides the weights by the number of visible keys (silu, HSTU-style).

The semantics are those of `attention.variants.apply_variant_torch`, the torch oracle:
  softmax         s
  softcap         cap * tanh(s / cap)
  sliding_window  -inf where q_pos - k_pos >= window
  alibi           s + slope_h * (k_pos - q_pos)
  sigmoid         no softmax; weights sigmoid(s)
  silu            no softmax; weights silu(s) / number of keys the query may see

A user variant `package.module:function` (`--attention-variant`) names a @triton.jit
function with the signature above; it is used as the `logits` transform under softmax.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from attention.variants import Variant

try:  # under TRITON_INTERPRET=1, @triton.jit makes an InterpretedFunction
    from triton.runtime.interpreter import InterpretedFunction

    _JIT_TYPES: tuple[type, ...] = (triton.runtime.JITFunction, InterpretedFunction)
except ImportError:  # pragma: no cover - older Triton
    _JIT_TYPES = (triton.runtime.JITFunction,)


@triton.jit
def identity(s, q_pos, k_pos, slope, param):
    return s


@triton.jit
def _tanh(x):
    # tanh through exp2, stable for large |x| (no tl.tanh in every Triton version).
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def softcap_logits(s, q_pos, k_pos, slope, param):
    return param * _tanh(s / param)


@triton.jit
def sliding_window_logits(s, q_pos, k_pos, slope, param):
    inside = (q_pos - k_pos).to(tl.float32) < param
    return tl.where(inside, s, float("-inf"))


@triton.jit
def alibi_logits(s, q_pos, k_pos, slope, param):
    return s + slope * (k_pos - q_pos).to(tl.float32)


@triton.jit
def sigmoid_weight(s, q_pos, k_pos, slope, param):
    return 1.0 / (1.0 + tl.exp(-s))


@triton.jit
def silu_weight(s, q_pos, k_pos, slope, param):
    return s / (1.0 + tl.exp(-s))


@dataclass(frozen=True)
class TritonVariant:
    """The Triton form of a `Variant`: what a kernel takes as constexpr arguments."""

    variant: Variant
    logits: Any  # triton JITFunction
    weight: Any  # triton JITFunction (identity for softmax variants)

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def param(self) -> float:
        return float(self.variant.param)

    @property
    def uses_softmax(self) -> bool:
        return self.variant.uses_softmax

    @property
    def normalize_by_visible(self) -> bool:
        return self.variant.normalize_by_visible

    @property
    def needs_slopes(self) -> bool:
        return self.variant.needs_slopes

    def kernel_args(self) -> dict[str, Any]:
        """Keyword arguments that every kernel of this package takes for the variant."""
        return {
            "LOGITS_FN": self.logits,
            "WEIGHT_FN": self.weight,
            "USE_SOFTMAX": self.uses_softmax,
            "NORMALIZE_BY_VISIBLE": self.normalize_by_visible,
            "HAS_SLOPES": self.needs_slopes,
        }


# The (logits, weight) functions of every entry of attention.variants.VARIANT_SPECS.
TRANSFORMS: dict[str, tuple[Any, Any]] = {
    "softmax": (identity, identity),
    "softcap": (softcap_logits, identity),
    "sliding_window": (sliding_window_logits, identity),
    "alibi": (alibi_logits, identity),
    "sigmoid": (identity, sigmoid_weight),
    "silu": (identity, silu_weight),
}


def resolve_user_function(spec: str) -> Any:
    """Import `package.module:function` and check that it is a Triton jitted function."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"a user attention variant is 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import attention-variant module {module_name!r}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no function {func_name!r}")
    if not isinstance(fn, _JIT_TYPES):
        raise ValueError(
            f"{spec!r} must be a @triton.jit function (s, q_pos, k_pos, slope, param) -> s"
        )
    return fn


def triton_variant(variant: Variant) -> TritonVariant:
    """The Triton transforms for a built-in or user variant."""
    if variant.is_builtin:
        return TritonVariant(variant, *TRANSFORMS[variant.name])
    return TritonVariant(variant, resolve_user_function(variant.name), identity)
