"""Tiny random MiniMax-Text-01 models saved as Hugging Face folders: the oracle's side of the
hybrid (lightning + softmax) checks; model and engine tests share them."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 288

# name -> config kwargs: MiniMax's pattern (linear layers with softmax ones between), and
# residual factors away from 1 so that each one is checked
VARIANTS: dict[str, dict] = {
    "alternating": dict(
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_attn_alpha_factor=0.9, linear_attn_beta_factor=1.1, full_attn_alpha_factor=1.2,
        full_attn_beta_factor=0.8, mlp_alpha_factor=0.95, mlp_beta_factor=1.05),
    # MiniMax-Text-01's 7:1 rhythm, shortened: three linear layers, then a softmax one
    "three-to-one": dict(
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_attn_alpha_factor=1.3, linear_attn_beta_factor=0.7),
}


@torch.no_grad()
def build_tiny(variant: str, gen: torch.Generator) -> torch.nn.Module:
    """transformers' MiniMax with random weights large enough to matter."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        num_local_experts=4, num_experts_per_tok=2, block_size=16, tie_word_embeddings=False,
        **VARIANTS[variant])
    model = MiniMaxForCausalLM(config).eval()
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def save_tiny(variant: str, folder: Path, seed: int) -> torch.nn.Module:
    model = build_tiny(variant, torch.Generator().manual_seed(seed))
    model.save_pretrained(folder, safe_serialization=True)
    return model
