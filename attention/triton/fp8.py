"""FP8 e4m3 quantization inside Triton kernels: the store kernels' half of
kvcache/kv_dtype.py, bit for bit.

The kernels' `KV_QUANT` constexpr says how the cache stores rows: QUANT_NONE (the model's
dtype), QUANT_PER_TENSOR (e4m3 codes, scale 1.0), QUANT_PER_TOKEN_HEAD (e4m3 codes and a
float32 scale per (token, KV head) row).

The rounding is done here, not by the float32 -> e4m3 cast: it rounds to the e4m3 grid in
float32 arithmetic (to nearest even), so the cast that follows is exact. Triton's
interpreter rounds that cast by truncating and adding the cut-off bit without carrying it
into the exponent (31.6 becomes 16, not 32), and the division is `div_rn` because a plain
float32 `/` compiles to an approximate division on NVIDIA GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

QUANT_NONE = 0
QUANT_PER_TENSOR = 1
QUANT_PER_TOKEN_HEAD = 2


def quant_mode(cache: torch.Tensor, scales: torch.Tensor | None) -> int:
    """The KV_QUANT constexpr of a cache tensor and its scales (None: no scales)."""
    if cache.dtype != torch.float8_e4m3fn:
        return QUANT_NONE
    return QUANT_PER_TOKEN_HEAD if scales is not None else QUANT_PER_TENSOR


@triton.jit
def row_scale(amax):
    """The scale of rows whose largest magnitude is `amax` (1.0 for all-zero rows); 448 is
    kvcache.kv_dtype.FP8_E4M3_MAX, e4m3's largest finite value."""
    return tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)


@triton.jit
def to_e4m3(y):
    """float32 -> e4m3 codes: clamped to +-448, rounded to nearest even (module docstring)."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # 0x80000000
    mag = bits & 0x7FFFFFFF
    # The grid step at |y| is 2^(e - 3) for normal e4m3 values (e >= -6) and 2^-9 below.
    # Adding C = 2^23 * step makes float32's own rounding snap |y| to that grid.
    exponent = tl.maximum(mag >> 23, 127 - 6)
    magic = ((exponent + 20) << 23).to(tl.float32, bitcast=True)
    rounded = (mag.to(tl.float32, bitcast=True) + magic) - magic
    snapped = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return snapped.to(tl.float8e4nv)



@triton.jit
def encode(x, scale, KV_QUANT: tl.constexpr):
    """Rows `x` (float32) as stored: e4m3 codes of x / scale (per-token-head), of x
    (per-tensor), or x itself (full precision; the caller casts it to the cache's type).
    KV_QUANT is QUANT_NONE, QUANT_PER_TENSOR or QUANT_PER_TOKEN_HEAD (0, 1, 2)."""
    if KV_QUANT == 2:
        return to_e4m3(tl.math.div_rn(x, scale))
    elif KV_QUANT == 1:
        return to_e4m3(x)
    else:
        return x
