"""DeepSeek-V2/V3 decoder in plain PyTorch: multi-head latent attention (MLA) and MoE.

MLA caches one row per token: the RMS-normed KV latent c (kv_lora_rank) and the rotated
rotary key k_pe (qk_rope_head_dim), shared by every head. Attention runs in the latent
space ("weight absorption"): `kv_b_proj` holds per head W_UK [qk_nope, rank] and
W_UV [v_head, rank]; the layer folds W_UK into the query, q_lat = q_nope W_UK, so that
q_nope . k_nope = q_lat . c, and hands the backend

    q  [T, H, rank + rope]   (q_lat | q_pe)          k  [T, 1, rank + rope]   (c | k_pe)

an MQA whose key is the whole cached row and whose value is its first `rank` columns. The
backend returns o_lat [T, H, rank]; the layer applies W_UV and o_proj.

Rotary: DeepSeek rotates interleaved pairs (2i, 2i+1); the loader permutes the rotary rows
of the q and kv_a projections into halves (model/deepseek_weights.py), which turns it into
the rotate-half convention of attention/rotary.py with the same q.k. YaRN's attention factor
is folded into the cos|sin cache, its mscale^2 into the softmax scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attention.base import AttentionBackend, RopeInputs
from attention.mla.base import MLAConfig
from attention.rotary import RotaryTables, apply_rotary, rotary_tables
from model.deepseek_config import DeepseekConfig, yarn_mscale
from model.llama import CausalLM, RMSNorm
from model.moe import DenseMLP, MoE

# DeepSeek's q_a / kv_a norms use their class default, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def mla_attention_config(config: DeepseekConfig) -> MLAConfig:
    """The MLAConfig a backend needs to serve this model."""
    return MLAConfig.create(config.num_heads, config.kv_lora_rank, config.qk_rope_head_dim,
                            config.softmax_scale())


def yarn_inv_freq(config: DeepseekConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [rope_dim / 2] float32, attention factor): YaRN blends interpolated
    (divided by `factor`) and original frequencies over a ramp between the dims that turn
    `beta_fast` and `beta_slow` times within the original context."""
    d, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    s = config.rope_scaling
    if s is None:
        return 1.0 / pos_freqs, 1.0
    factor = config._yarn_factor()
    old_ctx = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class MLARotary(nn.Module):
    """float32 [max_positions, rope_dim] cos|sin cache (attention/rotary.py's format)."""

    def __init__(self, config: DeepseekConfig) -> None:
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.register_buffer("cos_sin_cache",
                             torch.empty(self.max_positions, config.qk_rope_head_dim),
                             persistent=False)
        self.reset_cache(config)

    def reset_cache(self, config: DeepseekConfig) -> None:
        dev = self.cos_sin_cache.device
        inv_freq, factor = yarn_inv_freq(config)
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        self.cos_sin_cache = (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * factor).to(dev)

    def lookup(self, positions: torch.Tensor) -> RotaryTables:
        return rotary_tables(self.cos_sin_cache, positions)


class MLAAttention(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.num_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.rank = config.kv_lora_rank
        h, bias = config.hidden_size, config.attention_bias
        q_out = H * config.qk_head_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, q_out, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope_dim, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS, dtype)
        # W_UK and W_UV per head, as one [H * (nope + v), rank] matrix (the checkpoint's)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope_dim + self.v_dim), bias=False,
                                   dtype=dtype)
        self.o_proj = nn.Linear(H * self.v_dim, h, bias=bias, dtype=dtype)

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(hidden)
        assert self.q_a_proj is not None and self.q_a_layernorm is not None
        assert self.q_b_proj is not None
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, rope: RotaryTables,
                cos_sin_cache: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        T, H, r = hidden.shape[0], self.num_heads, self.rank
        q = self._query(hidden).view(T, H, self.nope_dim + self.rope_dim)
        kv_a = self.kv_a_proj_with_mqa(hidden)
        w_kv = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, r)
        q_full = q.new_empty(T, H, r + self.rope_dim)
        # q_lat = q_nope W_UK, per head: [H, T, nope] @ [H, nope, rank]
        q_full[..., :r] = torch.bmm(q[..., : self.nope_dim].transpose(0, 1),
                                    w_kv[:, : self.nope_dim]).transpose(0, 1)
        k_full = kv_a.new_empty(T, 1, r + self.rope_dim)
        k_full[:, 0, :r] = self.kv_a_layernorm(kv_a[:, :r])
        q_pe, k_pe = q[..., self.nope_dim :], kv_a[:, None, r:]
        fused = attn.capabilities.fused_rope_store
        if fused:
            q_full[..., r:] = q_pe
            k_full[..., r:] = k_pe
        else:
            q_full[..., r:] = apply_rotary(q_pe, rope)
            k_full[..., r:] = apply_rotary(k_pe, rope)
        fused_rope = RopeInputs(positions, cos_sin_cache) if fused else None
        o_lat = attn.attend(q_full, k_full, k_full[..., :r], self.layer_idx, fused_rope)
        # o = o_lat W_UV^T, per head: [H, T, rank] @ [H, rank, v]
        out = torch.bmm(o_lat.transpose(0, 1), w_kv[:, self.nope_dim :].transpose(1, 2))
        return self.o_proj(out.transpose(0, 1).reshape(T, H * self.v_dim))


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = MLAAttention(config, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp: MoE | DenseMLP = (
            MoE(config, dtype) if config.is_moe_layer(layer_idx)
            else DenseMLP(config.hidden_size, config.intermediate_size, dtype))

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, rope: RotaryTables,
                cos_sin_cache: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        h = hidden + self.self_attn(self.input_layernorm(hidden), positions, rope,
                                    cos_sin_cache, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekForCausalLM(CausalLM):
    """`model.llama.CausalLM` with DeepSeek's decoder layers (MLA + MoE) and its rotary
    (YaRN): the same `forward` and `compute_logits`."""

    def __init__(self, config: DeepseekConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(config, dtype)  # type: ignore[arg-type]

    def make_layer(self, config: DeepseekConfig, index: int,  # type: ignore[override]
                   dtype: torch.dtype) -> nn.Module:
        return DeepseekDecoderLayer(config, index, dtype)

    def make_rotary(self, config: DeepseekConfig) -> MLARotary:  # type: ignore[override]
        return MLARotary(config)
