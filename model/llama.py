"""Llama-family decoder in plain PyTorch (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2).

The model never sees pages: each layer computes q [T, Hq, D], k, v [T, Hkv, D] for the
step's T new tokens and hands them to the attention backend, which stores K/V into the
paged pool and attends over cached prefix + new tokens.

Rotary: `model.rotary.cos_sin_cache` is the float32 [max_positions, head_dim] cos|sin
cache of attention/rotary.py (Llama-3 scaling folded into inv_freq). When the backend
declares `capabilities.fused_rope_store`, a layer hands it q and k unrotated (after Qwen3's
q/k norm) with `RopeInputs`; otherwise the layer rotates them in torch. q, k and v may be
strided views into the fused qkv projection (last dimension contiguous).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attention.base import AttentionBackend, AttentionConfig, RopeInputs
from attention.rotary import RotaryTables, apply_rotary, rotary_tables
from attention.variants import Variant
from model.config import ModelConfig


def attention_config(config: ModelConfig, variant: Variant | None = None) -> AttentionConfig:
    """The AttentionConfig a backend needs to serve this model."""
    return AttentionConfig(
        num_q_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        scale=config.head_dim**-0.5,
        variant=variant or Variant(),
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel on GPU; statistics are accumulated in float32 for low-precision x.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies, with Llama-3 scaling applied if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor = float(s["factor"])
    low_ff = float(s.get("low_freq_factor", 1.0))
    high_ff = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    scaled = torch.where(wavelen > old_ctx / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_ctx / high_ff) & (wavelen <= old_ctx / low_ff)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos|sin cache indexed by absolute positions (see the module docstring)."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.max_positions = max_positions or config.max_position_embeddings
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.register_buffer(
            "cos_sin_cache", torch.empty(self.max_positions, self.head_dim), persistent=False
        )
        if self.inv_freq.device.type != "meta":
            self.reset_cache()

    def reset_cache(self, config: ModelConfig | None = None) -> None:
        """(Re)compute the cache on its current device (needed after `to_empty`)."""
        dev = self.cos_sin_cache.device
        if config is not None:
            self.inv_freq = rope_inv_freq(config).to(dev)
        else:
            self.inv_freq = self.inv_freq.to(dev)
        pos = torch.arange(self.max_positions, device=dev, dtype=torch.int64).float()
        # Same float32 product as the reference implementation, so angles match bit for bit.
        freqs = pos[:, None] * self.inv_freq.float()[None, :]
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def lookup(self, positions: torch.Tensor) -> RotaryTables:
        """Per-step tables for these positions, shared by every layer."""
        return rotary_tables(self.cos_sin_cache, positions)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Convenience: rotate x [T, H, D] at `positions` [T]."""
        return apply_rotary(x, self.lookup(positions))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias, dtype=dtype
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False, dtype=dtype)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryTables,
        cos_sin_cache: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        T = hidden.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(hidden)
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, D)
        fused = attn.capabilities.fused_rope_store
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(qkv[:, : self.q_size].view(T, Hq, D))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(T, Hkv, D))
            if not fused:
                q = apply_rotary(q, rope)
                k = apply_rotary(k, rope)
        elif fused:
            q = qkv[:, : self.q_size].view(T, Hq, D)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, Hkv, D)
        else:
            # q and k rotated together: one set of kernels instead of two.
            qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(T, Hq + Hkv, D), rope)
            q, k = qk[:, :Hq], qk[:, Hq:]
        fused_rope = RopeInputs(positions, cos_sin_cache) if fused else None
        out = attn.attend(q, k, v, self.layer_idx, fused_rope)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=False, dtype=dtype
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=False, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: RotaryTables,
        cos_sin_cache: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        h = hidden + self.self_attn(
            self.input_layernorm(hidden), positions, rope, cos_sin_cache, attn
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Decoder-only LM. `forward` -> final-normed hidden states; `compute_logits` -> float32."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            self.make_layer(config, i, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.rotary = self.make_rotary(config)
        # the LM head's product: F.linear, or the skinny kernel's (model/decode_gemm.py)
        self.logits_linear: Callable[..., torch.Tensor] = F.linear

    # A family with other layers or another rotary (model/deepseek.py) overrides these two.
    def make_layer(self, config: ModelConfig, index: int, dtype: torch.dtype) -> nn.Module:
        return DecoderLayer(config, index, dtype)

    def make_rotary(self, config: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cache = self.rotary.cos_sin_cache
        rope = self.rotary.lookup(positions)  # once per step, shared by every layer
        for layer in self.layers:
            hidden = layer(hidden, positions, rope, cache, attn)
        return self.norm(hidden)

    @property
    def logits_weight(self) -> torch.Tensor:
        """The LM head's weight: the embedding table when the two are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_linear(hidden, self.logits_weight).float()
