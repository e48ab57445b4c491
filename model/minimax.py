"""MiniMax-Text-01 decoder in plain PyTorch: lightning attention layers interleaved with
softmax attention layers, a Mixtral-style MoE in every layer.

A lightning layer is linear attention with a per-head exponential decay: with q, k, v the
SiLU of one fused projection (laid out per head as q | k | v), every head keeps a float32
state S (head_dim x head_dim) that each token decays by exp(-slope) and adds k^T v to; the
token's output is q S. The outputs of all heads are RMS-normed together, gated by
sigmoid(output_gate(x)) and projected back. The state lives in a state slot beside the
paged KV cache (kvcache/state_pool.py); the backend updates it (attention/backends/
lightning.py). Softmax layers are Llama attention over the paged cache; a softmax layer's
index in the KV pool is its rank among the softmax layers (kvcache/cache_spec.py).

Residuals follow the checkpoint: each sublayer's residual is its normed input, weighted by
the layer kind's alpha, plus the sublayer's output weighted by its beta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attention.backends.lightning import HybridStateBackend
from attention.linear import slopes_for_layer
from attention.rotary import RotaryTables
from model.llama import Attention, CausalLM, RMSNorm
from model.minimax_config import MiniMaxConfig
from model.moe import MoE

# transformers' MiniMaxLightningAttention builds its output norm with the class default eps
LIGHTNING_NORM_EPS = 1e-6


class LightningAttention(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int, state_index: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.state_index = state_index
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        width = config.num_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * width, bias=False, dtype=dtype)
        self.output_gate = nn.Linear(config.hidden_size, width, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(width, config.hidden_size, bias=False, dtype=dtype)
        self.norm = RMSNorm(width, LIGHTNING_NORM_EPS, dtype)
        self.register_buffer(
            "slopes", slopes_for_layer(config.num_heads, layer_idx, config.num_layers),
            persistent=False)

    def forward(self, hidden: torch.Tensor, attn: HybridStateBackend) -> torch.Tensor:
        T = hidden.shape[0]
        H, D = self.num_heads, self.head_dim
        qkv = F.silu(self.qkv_proj(hidden)).view(T, H, 3 * D)
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        out = attn.attend_linear(q, k, v, self.slopes, self.state_index)
        out = self.norm(out.reshape(T, H * D))
        return self.out_proj(torch.sigmoid(self.output_gate(hidden)) * out)


class MiniMaxDecoderLayer(nn.Module):
    def __init__(self, config: MiniMaxConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.is_linear = config.is_linear_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if self.is_linear:
            self.self_attn: nn.Module = LightningAttention(
                config, layer_idx, config.linear_layers.index(layer_idx), dtype)
            self.attn_alpha = config.linear_attn_alpha_factor
            self.attn_beta = config.linear_attn_beta_factor
        else:
            # the Llama layer, addressed by its rank among the softmax layers (pool index)
            self.self_attn = Attention(config, config.softmax_layers.index(layer_idx), dtype)
            self.attn_alpha = config.full_attn_alpha_factor
            self.attn_beta = config.full_attn_beta_factor
        self.mlp = MoE(config, dtype)
        self.mlp_alpha = config.mlp_alpha_factor
        self.mlp_beta = config.mlp_beta_factor

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, rope: RotaryTables,
                cos_sin_cache: torch.Tensor, attn: HybridStateBackend) -> torch.Tensor:
        x = self.input_layernorm(hidden)
        if self.is_linear:
            a = self.self_attn(x, attn)
        else:
            a = self.self_attn(x, positions, rope, cos_sin_cache, attn)
        h = self.post_attention_layernorm(x * self.attn_alpha + a * self.attn_beta)
        return h * self.mlp_alpha + self.mlp(h) * self.mlp_beta


class MiniMaxForCausalLM(CausalLM):
    """`forward` needs a `HybridStateBackend`: softmax layers attend over the paged cache
    through it, lightning layers update their state slots through it."""

    config: MiniMaxConfig

    def make_layer(self, config: MiniMaxConfig, index: int,  # type: ignore[override]
                   dtype: torch.dtype) -> nn.Module:
        return MiniMaxDecoderLayer(config, index, dtype)

