"""`--decode-gemm`: which matrix multiply serves a decode step's projections and LM head.

"torch" leaves every layer as built (F.linear: cuBLAS on a GPU). "triton" turns the
model's plain nn.Linear layers into `SkinnyLinear` and its LM head's product into
`skinny_or_torch`, once, at load time: a call of at most MAX_ROWS rows (a decode step of a
CUDA-graph bucket up to 64, its sampled rows' logits) runs model/skinny_gemm.py, anything
larger (prefill, mixed steps of more tokens) stays with F.linear. The choice is by row count
alone, one branch per call; inside a captured graph even that branch is gone.

Tensor-parallel `RowParallelLinear` layers (o_proj and down_proj of a split model) are
subclasses with their own forward and keep F.linear.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.llama import CausalLM
from model.skinny_gemm import (
    MAX_ROWS,
    SkinnyConfig,
    choose_config,
    num_sms,
    row_block,
    skinny_linear,
)

DecodeGemm = Literal["torch", "triton"]
DECODE_GEMMS: tuple[str, ...] = ("torch", "triton")
SKINNY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x by weight^T goes to the skinny kernel."""
    return x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype == weight.dtype


def skinny_or_torch(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, by the skinny kernel when x has at most MAX_ROWS rows."""
    if skinny_applies(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class SkinnyLinear(nn.Linear):
    """nn.Linear whose decode-sized calls run the skinny kernel (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_or_torch(x, self.weight, self.bias)


def check_decode_gemm(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError (one line) for a mode this device or dtype cannot run."""
    if mode not in DECODE_GEMMS:
        raise ValueError(f"--decode-gemm must be one of {', '.join(DECODE_GEMMS)}, got {mode!r}")
    if mode == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--decode-gemm triton needs a CUDA device (or TRITON_INTERPRET=1)")
        if dtype not in SKINNY_DTYPES:
            raise ValueError(f"--decode-gemm triton does not take {dtype} weights")


def use_decode_gemm(model: CausalLM, mode: str) -> int:
    """Switch the model's projections and LM head to `mode`; returns the layers switched.
    With "triton" on a GPU, the LM head's kernel instances for every row block are built
    now (the logits run eagerly, outside the captured graphs)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    check_decode_gemm(mode, device, dtype)
    switched = 0
    if mode == "torch":
        for module in model.modules():
            if type(module) is SkinnyLinear:
                module.__class__ = nn.Linear
                switched += 1
        model.logits_linear = F.linear
        return switched
    for module in model.modules():
        # exactly nn.Linear: a subclass (RowParallelLinear) has a forward of its own
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            switched += 1
    model.logits_linear = skinny_or_torch
    if device.type == "cuda":
        _build_logits_kernels(model)
    return switched


def _build_logits_kernels(model: CausalLM) -> None:
    weight = model.logits_weight
    n, k = weight.shape
    sms = num_sms(weight.device)
    built: set[tuple[int, SkinnyConfig]] = set()
    with torch.inference_mode():
        for m in range(1, MAX_ROWS + 1):  # one call per (row block, config): one instance
            config = choose_config(m, n, k, sms)
            if (row_block(m, config.use_dot), config) not in built:
                built.add((row_block(m, config.use_dot), config))
                skinny_linear(torch.zeros(m, k, device=weight.device, dtype=weight.dtype),
                              weight, config=config)
    torch.cuda.synchronize(weight.device)
