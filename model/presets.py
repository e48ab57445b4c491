"""Synthetic presets: real model shapes with seeded random weights (for GPU benchmarks)."""

from __future__ import annotations

import dataclasses

import torch

from model.config import ModelConfig
from model.llama import CausalLM

SYNTHETIC_PRESETS: dict[str, ModelConfig] = {
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
}


def synthetic_config(name: str) -> ModelConfig:
    key = name.removeprefix("synthetic:").lower()
    if key not in SYNTHETIC_PRESETS:
        raise ValueError(
            f"unknown synthetic preset {name!r}; choose one of {sorted(SYNTHETIC_PRESETS)}"
        )
    return dataclasses.replace(SYNTHETIC_PRESETS[key])


@torch.no_grad()
def init_synthetic_weights(model: CausalLM, seed: int, std: float = 0.02) -> None:
    """Norm weights 1, everything else N(0, std), drawn on the model's device."""
    device = model.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=gen)
