"""The DeepSeek MoE feed-forward: a router, routed experts, shared experts.

Routing follows the configs: V2 scores with softmax and takes the top k (`greedy`), or first
keeps the `topk_group` groups whose best expert scores highest (`group_limited_greedy`); V3
scores with sigmoid, adds `e_score_correction_bias` for choosing only, keeps the groups whose
two best biased scores sum highest and weights the chosen experts by their unbiased scores
(`noaux_tc`). Weights are optionally renormalised, then scaled by `routed_scaling_factor`.

Experts run grouped, never per token: the (token, expert) pairs are sorted by expert, so
each expert's tokens are one contiguous block, and `torch._grouped_mm` multiplies every
block by its expert's weights in one call (CPU and GPU). Without it, one matmul per expert
over its block; the block sizes then need one device-to-host copy per layer.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class MoEConfig(Protocol):
    """What the router and the experts read of a family's config (DeepSeek, MiniMax)."""

    hidden_size: int
    num_experts_per_tok: int
    scoring_func: str
    topk_method: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_shared_experts: int
    n_group: int
    topk_group: int

    @property
    def n_routed_experts(self) -> int: ...

    @property
    def moe_intermediate_size(self) -> int: ...


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused (the dense layers and the shared experts)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Chooses `num_experts_per_tok` experts per token; float32 throughout, as the checkpoints'
    reference code (the gate weight stays float32 whatever the model's dtype)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias: nn.Parameter | None = None
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k] int64)."""
        c = self.config
        logits = F.linear(x.float(), self.weight)
        scores = logits.softmax(-1) if c.scoring_func == "softmax" else logits.sigmoid()
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias
        if c.topk_method != "greedy":
            choice = self._keep_best_groups(choice)
        ids = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids

    def _keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        c = self.config
        T, E = choice.shape
        grouped = choice.view(T, c.n_group, E // c.n_group)
        if c.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        keep = group_score.topk(c.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        # dropped groups: -inf for biased sigmoid scores (may be negative), 0 as V2 does
        fill = float("-inf") if c.topk_method == "noaux_tc" else 0.0
        return grouped.masked_fill(~mask[:, :, None], fill).view(T, E)


def expert_blocks(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the [T, k] (token, expert) pairs by expert: (pair order [T*k], the end offset of
    each expert's block [E] int32)."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    # scatter_add, not bincount: bincount reads its input's max on the host, which a CUDA
    # graph capture cannot do
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return order, counts.cumsum(0, dtype=torch.int32)


def grouped_matmul(x: torch.Tensor, weights_t: torch.Tensor, ends: torch.Tensor,
                   use_grouped_mm: bool) -> torch.Tensor:
    """Rows [ends[e-1], ends[e]) of x [N, K] times weights_t[e] [K, M] -> [N, M]."""
    if use_grouped_mm:
        return torch._grouped_mm(x, weights_t, offs=ends)
    return per_expert_matmul(x, weights_t, ends)


def per_expert_matmul(x: torch.Tensor, weights_t: torch.Tensor,
                      ends: torch.Tensor) -> torch.Tensor:
    """grouped_matmul without torch's grouped GEMM: one matmul per non-empty expert block
    (the block ends are read on the host: one sync, no CUDA graph)."""
    out = x.new_empty(x.shape[0], weights_t.shape[-1])
    start = 0
    for e, end in enumerate(ends.tolist()):  # one matmul per expert, over its whole block
        if end > start:
            torch.matmul(x[start:end], weights_t[e], out=out[start:end])
        start = end
    return out


class RoutedExperts(nn.Module):
    """Every routed expert's SwiGLU weights stacked: gate|up [E, 2I, H], down [E, H, I]."""

    def __init__(self, config: MoEConfig, dtype: torch.dtype) -> None:
        super().__init__()
        E, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.intermediate_size = i
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * i, h, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(E, h, i, dtype=dtype))
        self.use_grouped_mm = HAS_GROUPED_MM

    def _grouped_mm_for(self, x: torch.Tensor) -> bool:
        """torch's grouped GEMM serves float32/bf16/fp16 CPU tensors and bf16 on CUDA
        (sm90+)."""
        if not self.use_grouped_mm or x.dtype == torch.float64:
            return False
        if x.device.type == "cpu":
            return True
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        T, k = ids.shape
        order, ends = expert_blocks(ids, self.num_experts)
        token = order // k  # the token of each sorted (token, expert) pair
        xs = x[token]
        grouped = self._grouped_mm_for(x)
        try:
            gate_up = grouped_matmul(xs, self.gate_up_proj.transpose(1, 2), ends, grouped)
        except RuntimeError:  # a grouped GEMM this build refuses (layout, arch): serve anyway
            if not grouped:
                raise
            logger.warning("torch._grouped_mm refused the expert weights; one matmul per "
                           "expert from now on", exc_info=True)
            self.use_grouped_mm = grouped = False
            gate_up = grouped_matmul(xs, self.gate_up_proj.transpose(1, 2), ends, grouped)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        ys = grouped_matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2), ends, grouped)
        acc = torch.promote_types(x.dtype, torch.float32)  # weighted sum in >= float32
        ys = ys.to(acc) * weights.flatten()[order, None]
        out = torch.zeros(T, x.shape[1], dtype=acc, device=x.device)
        return out.index_add_(0, token, ys).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: MoEConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config, dtype)
        self.shared_experts: DenseMLP | None = None
        if config.n_shared_experts:
            self.shared_experts = DenseMLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
