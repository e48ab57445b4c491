"""Synthetic presets: real model shapes with seeded random weights (for GPU benchmarks)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from model.config import ModelConfig
from model.deepseek_config import DeepseekConfig
from model.minimax_config import MiniMaxConfig

# MiniMax-Text-01's 7:1 rhythm: seven lightning layers, then a softmax one
_MINIMAX_16_LAYERS = (["linear_attention"] * 7 + ["full_attention"]) * 2


class WeightShard(Protocol):
    """A tensor-parallel rank's part of each parameter (model/parallel/sharding.py)."""

    def full_shape(self, param: str, local_shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def param_part(self, param: str, full: torch.Tensor) -> torch.Tensor: ...

SYNTHETIC_PRESETS: dict[str, ModelConfig | DeepseekConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_ids=[2], architecture="LlamaForCausalLM",
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=[128001, 128009], architecture="LlamaForCausalLM",
    ),
    # Llama-3.1-70B's shapes: 70.6B parameters, about 141 GB in bf16, more than one GPU
    # holds (served with --tensor-parallel-size 4 or 8, docs/tensor-parallel.md).
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_ids=[128001, 128009], architecture="LlamaForCausalLM",
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=32768,
        bos_token_id=151643, eos_token_ids=[151645, 151643], architecture="Qwen2ForCausalLM",
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, qk_norm=True, max_position_embeddings=40960,
        bos_token_id=151643, eos_token_ids=[151645, 151643], architecture="Qwen3ForCausalLM",
    ),
    # DeepSeek-V2-Lite's config.json: MLA without q compression, 64 routed experts (6 per
    # token) + 2 shared, the first layer dense, YaRN x40 over a 4k original context.
    "deepseek-v2-lite": DeepseekConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27,
        num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, q_lora_rank=None, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, bos_token_id=100000, eos_token_ids=[100001],
        architecture="DeepseekV2ForCausalLM",
    ),
    # MiniMax-Text-01 scaled to one GPU: its attention (64 heads x 128, 8 KV heads, hidden
    # 6144), layer rhythm and residual factors, vocab 200064, experts of its width (9216, top
    # 2), but 16 of its 80 layers (2 softmax) and 4 of its 32 experts: 17.1B parameters,
    # 34.2 GB in bf16; a request's state takes 14 x 4 MiB
    "minimax-text-01-16l": MiniMaxConfig(
        vocab_size=200064, hidden_size=6144, intermediate_size=9216, num_layers=16,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000000.0,
        max_position_embeddings=131072, bos_token_id=200034, eos_token_ids=[200020],
        layer_types=_MINIMAX_16_LAYERS, num_local_experts=4, num_experts_per_tok=2,
        linear_attn_alpha_factor=3.5565588200778455, full_attn_alpha_factor=3.5565588200778455,
        mlp_alpha_factor=3.5565588200778455,
    ),
}


def synthetic_config(name: str) -> ModelConfig | DeepseekConfig:
    key = name.removeprefix("synthetic:").lower()
    if key not in SYNTHETIC_PRESETS:
        raise ValueError(
            f"unknown synthetic preset {name!r}; choose one of {sorted(SYNTHETIC_PRESETS)}"
        )
    return dataclasses.replace(SYNTHETIC_PRESETS[key])


@torch.no_grad()
def init_synthetic_weights(model: torch.nn.Module, seed: int, std: float | None = None,
                           shard: WeightShard | None = None) -> None:
    """Seeded random weights, drawn on the model's device.

    By default the scaled initialisation that GPT-2-style models train from: norm weights 1,
    biases 0, embeddings N(0, 0.02), every other matrix N(0, 1/fan_in), and the two that
    write into the residual stream (attention output, MLP down) further scaled by
    1/sqrt(2 * layers). A flat N(0, 0.02) on a 32-layer, 4096-wide model makes every layer
    amplify rounding noise: two bf16 runs that differ by one rounding in one attention
    output end ~5% apart in the logits, which hides what a kernel check should see (CPU
    proxy of llama3-8b, 32 layers: 4.3e-2 flat, 1.7e-2 scaled). `std` instead draws every
    non-norm parameter from N(0, std) (tests that want large weights). With `shard` (a
    tensor-parallel rank's model), each parameter is drawn whole, as the unsplit model draws
    it, and the rank keeps its part: every tensor-parallel size serves the same weights."""
    device = model.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    residual_scale = (2 * model.config.num_layers) ** -0.5
    for name, local in model.named_parameters():
        param = local
        if shard is not None:
            param = torch.empty(shard.full_shape(name, tuple(local.shape)), dtype=local.dtype,
                                device=local.device)
        _draw(name, param, gen, std, residual_scale)
        if shard is not None:
            local.copy_(shard.param_part(name, param))


def _draw(name: str, param: torch.Tensor, gen: torch.Generator, std: float | None,
          residual_scale: float) -> None:
    """One parameter's draw (see init_synthetic_weights)."""
    if name.endswith("norm.weight"):
        param.fill_(1.0)
    elif std is not None:
        param.normal_(0.0, std, generator=gen)
    elif name.endswith("bias"):
        param.zero_()
    elif "embed_tokens" in name:
        param.normal_(0.0, 0.02, generator=gen)
    else:
        scale = param.shape[-1] ** -0.5
        if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight",
                          "experts.down_proj")):
            scale *= residual_scale
        param.normal_(0.0, scale, generator=gen)
