"""How K/V rows are stored: the model's dtype, or FP8 e4m3 codes with scales.

`--kv-cache-dtype auto|fp8|fp8_e4m3` and `--kv-cache-scale per-token-head|per-tensor`
resolve to one `KVCacheDtype`. With FP8 and `per-token-head`, each (token, KV head) row of
head_dim values gets its own float32 scale, computed when the row is stored:

    scale = amax(|row|) / 448 (1.0 for an all-zero row),  code = e4m3(row / scale)

rounded to nearest even and saturated at +-448; a row reads back as code * scale.
`per-tensor` keeps no scales (a fixed scale of 1.0: vLLM's uncalibrated default), so values
beyond +-448 saturate and small ones lose precision; it is kept for comparison.

The scales of a layer are one float32 tensor [pages, kv_heads, page_size] beside the K (and
one beside the V) pages, indexed by slot like the rows: whoever owns a page owns its
scales, so the allocator, the prefix cache and preemption need nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_CACHE_SCALES = ("per-token-head", "per-tensor")
PER_TOKEN_HEAD = "per-token-head"
PER_TENSOR = "per-tensor"
SCALE_BYTES = 4  # float32 scales


@dataclass(frozen=True)
class KVCacheDtype:
    """The storage of K/V rows: `dtype` their element type; `scale_mode` None for full
    precision, else PER_TOKEN_HEAD or PER_TENSOR (FP8 only)."""

    dtype: torch.dtype
    scale_mode: str | None = None

    def __post_init__(self) -> None:
        if self.is_fp8 != (self.scale_mode is not None):
            raise ValueError("an FP8 KV cache needs a scale mode, and only FP8 takes one")
        if self.scale_mode is not None and self.scale_mode not in KV_CACHE_SCALES:
            raise ValueError(f"unknown KV scale mode {self.scale_mode!r}")

    @classmethod
    def from_flags(cls, kv_cache_dtype: str, kv_cache_scale: str,
                   model_dtype: torch.dtype) -> KVCacheDtype:
        """What the flags ask for; `auto` is the model's dtype (ValueError for other values)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unsupported --kv-cache-dtype {kv_cache_dtype!r}; choose one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if kv_cache_scale not in KV_CACHE_SCALES:
            raise ValueError(f"unsupported --kv-cache-scale {kv_cache_scale!r}; choose one of "
                             f"{', '.join(KV_CACHE_SCALES)}")
        if kv_cache_dtype == "auto":
            return cls(model_dtype)
        return cls(torch.float8_e4m3fn, kv_cache_scale)

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    @property
    def has_scales(self) -> bool:
        """Whether float32 scales are stored beside the pages."""
        return self.scale_mode == PER_TOKEN_HEAD

    @property
    def name(self) -> str:
        """The metric label and report name: fp8_e4m3, or the model dtype's name."""
        return "fp8_e4m3" if self.is_fp8 else str(self.dtype).removeprefix("torch.")

    @property
    def storage_name(self) -> str:
        """The element type's torch name (what `KVLayout.create` takes)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> int:
        """K and V bytes of one token in one layer, scales counted."""
        row = head_dim * self.element_bytes + (SCALE_BYTES if self.has_scales else 0)
        return 2 * num_kv_heads * row

    def describe(self) -> str:
        return self.name if self.scale_mode is None else f"{self.name} ({self.scale_mode} scales)"


def quantize_rows(x: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., D] -> e4m3 codes [..., D] and float32 scales [...] (None for per-tensor).
    The definition the store kernel matches bit for bit."""
    x = x.float()
    if scale_mode == PER_TENSOR:
        return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), None
    amax = x.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    codes = (x / scales[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return codes.to(torch.float8_e4m3fn), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., D] (e4m3) and scales [...] -> values [..., D] in `dtype`, computed in
    float32 (float64 when that is asked for, where code * scale is exact)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    values = codes.to(compute)
    if scales is not None:
        values = values * scales.to(compute)[..., None]
    return values.to(dtype)
