"""Tiny random DeepSeek-V2/V3 models saved as Hugging Face folders: the oracle's side of the
MLA + MoE checks (model and engine tests share them)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8, num_experts_per_tok=3,
    first_k_dense_replace=1, max_position_embeddings=256, tie_word_embeddings=False,
)
# YaRN over a short original context, so interpolation, the ramp and both mscales all act
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
         "mscale": 1.0, "mscale_all_dim": 0.5}

# name -> (transformers class names, config kwargs)
VARIANTS: dict[str, tuple[str, dict]] = {
    # V2-Lite's shape of things: no q compression, softmax greedy routing, plain rotary
    "v2-lite": ("DeepseekV2", dict(_COMMON, q_lora_rank=None, n_shared_experts=2,
                                   topk_method="greedy")),
    # V2: q compression, group-limited greedy routing, YaRN
    "v2-group": ("DeepseekV2", dict(_COMMON, q_lora_rank=24, n_shared_experts=1,
                                    topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=1.5, rope_parameters=_YARN)),
    # V3: sigmoid + correction bias, group top-k, normalised weights, YaRN, interleaved rotary
    "v3": ("DeepseekV3", dict(_COMMON, q_lora_rank=24, n_shared_experts=1, n_group=4,
                              topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                              rope_parameters=_YARN, rope_interleave=True)),
    # V3 with half-split rotary
    "v3-halves": ("DeepseekV3", dict(_COMMON, q_lora_rank=None, n_shared_experts=1, n_group=2,
                                     topk_group=1, norm_topk_prob=True,
                                     rope_interleave=False)),
}


@torch.no_grad()
def build_tiny(variant: str, gen: torch.Generator) -> torch.nn.Module:
    """transformers' model of `variant` with random weights large enough to matter."""
    import transformers as tf

    family, kwargs = VARIANTS[variant]
    config = getattr(tf, f"{family}Config")(**kwargs)
    model = getattr(tf, f"{family}ForCausalLM")(config).eval()
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # a bias that changes the choice
            buf.copy_(0.2 * torch.randn(buf.shape, generator=gen))
    return model


def save_tiny(variant: str, folder: Path, seed: int) -> torch.nn.Module:
    model = build_tiny(variant, torch.Generator().manual_seed(seed))
    model.save_pretrained(folder, safe_serialization=True)
    return model
