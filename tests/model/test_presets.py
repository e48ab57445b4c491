"""Synthetic presets: real shapes (checked against the published parameter counts on the meta
device), Llama-3 rope scaling against transformers, seeded weights on a real load."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from model.config import ModelConfig
from model.deepseek import DeepseekForCausalLM
from model.llama import CausalLM
from model.loader import empty_model, load_model
from model.presets import SYNTHETIC_PRESETS, init_synthetic_weights, synthetic_config
from tests.model.hf_reference import PagedRunner

# Parameter counts published on the models' Hugging Face pages / safetensors index.
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,  # Llama-3.1-70B
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}


LLAMA_PRESETS = sorted(n for n, c in SYNTHETIC_PRESETS.items() if type(c) is ModelConfig)


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_preset_shapes_match_the_real_models(name):
    cfg = synthetic_config(f"synthetic:{name}")
    with torch.device("meta"):
        model = CausalLM(cfg, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert count == PUBLISHED_PARAMS[name] == cfg.num_parameters()
    attn = model.layers[0].self_attn
    assert attn.qkv_proj.weight.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    assert (attn.qkv_proj.bias is not None) == (name == "qwen2.5-7b")
    assert (attn.q_norm is not None) == (name == "qwen3-8b")
    assert (model.lm_head is None) == cfg.tie_word_embeddings


def test_deepseek_v2_lite_preset_has_the_real_shapes():
    cfg = synthetic_config("deepseek-v2-lite")
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert count == cfg.num_parameters()
    assert round(count / 1e9, 1) == 15.7  # DeepSeek-V2-Lite: 15.7B parameters, as published
    attn = model.layers[0].self_attn
    assert attn.q_proj is not None and attn.q_a_proj is None  # no q compression
    assert attn.q_proj.weight.shape == (16 * 192, 2048)
    assert attn.kv_a_proj_with_mqa.weight.shape == (512 + 64, 2048)
    assert attn.kv_b_proj.weight.shape == (16 * (128 + 128), 512)
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, 27))
    moe = model.layers[1].mlp
    assert moe.experts.gate_up_proj.shape == (64, 2 * 1408, 2048)
    assert moe.shared_experts.down_proj.weight.shape == (2048, 2 * 1408)
    assert cfg.num_experts_per_tok == 6
    # the latent cache: 576 values a token a layer, 1,152 bytes in bf16
    (spec,) = set(cfg.layer_cache_specs())
    assert spec.values_per_token() == 576


def test_minimax_preset_has_minimax_text_01_shapes():
    from model.minimax import LightningAttention, MiniMaxForCausalLM

    cfg = synthetic_config("minimax-text-01-16l")
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    assert count == cfg.num_parameters() and round(count / 1e9, 1) == 17.1
    assert cfg.softmax_layers == [7, 15]
    lightning = model.layers[0].self_attn
    assert isinstance(lightning, LightningAttention)
    assert lightning.qkv_proj.weight.shape == (3 * 64 * 128, 6144)
    assert model.layers[7].self_attn.qkv_proj.weight.shape == ((64 + 2 * 8) * 128, 6144)
    assert model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 9216, 6144)
    specs = cfg.layer_cache_specs()
    assert specs[0].state_bytes() == 64 * 128 * 128 * 4 and specs[7].values_per_token() == 2048


def test_llama3_preset_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = synthetic_config("llama3-8b")
    hf_cfg = LlamaConfig(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_scaling={**cfg.rope_scaling, "rope_theta": cfg.rope_theta},
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.rotary.to_empty(device="cpu")
    model.rotary.reset_cache(cfg)
    assert torch.allclose(model.rotary.inv_freq, ref.float(), rtol=1e-6, atol=0)
    pos = 100_000
    cache = model.rotary.cos_sin_cache
    assert cache.shape == (cfg.max_position_embeddings, cfg.head_dim)
    angles = pos * ref.float()
    half = cfg.head_dim // 2
    assert torch.allclose(cache[pos, :half], angles.cos(), atol=1e-6)
    assert torch.allclose(cache[pos, half:], angles.sin(), atol=1e-6)


def test_synthetic_weights_are_seeded():
    cfg = dataclasses.replace(synthetic_config("qwen3-8b"), vocab_size=64, hidden_size=32,
                              intermediate_size=48, num_layers=2, head_dim=8,
                              max_position_embeddings=64)
    seed = random.randrange(1000)

    def build(s: int) -> dict[str, torch.Tensor]:
        model = empty_model(cfg, torch.float32, torch.device("cpu"))
        init_synthetic_weights(model, s)
        return dict(model.named_parameters())

    a, b, c = build(seed), build(seed), build(seed + 1)
    for name, p in a.items():
        assert torch.equal(p, b[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.equal(p, c[name]), name


def test_synthetic_load_runs():
    loaded = load_model("synthetic:smollm2-135m", torch.float32, torch.device("cpu"),
                        seed=random.randrange(1000), with_tokenizer=False)
    cfg = loaded.config
    # the scaled initialisation: 1/sqrt(fan_in), residual-stream writers / sqrt(2 * layers)
    layer = loaded.model.layers[3]
    expected = {
        layer.mlp.gate_up_proj.weight: cfg.hidden_size ** -0.5,
        layer.self_attn.qkv_proj.weight: cfg.hidden_size ** -0.5,
        layer.mlp.down_proj.weight: (cfg.intermediate_size * 2 * cfg.num_layers) ** -0.5,
        layer.self_attn.o_proj.weight: (cfg.num_heads * cfg.head_dim * 2 * cfg.num_layers) ** -0.5,
        loaded.model.embed_tokens.weight: 0.02,
    }
    for w, std in expected.items():
        assert math.isclose(w.std().item(), std, rel_tol=0.03), (w.shape, w.std().item(), std)
        assert abs(w.mean().item()) < std / 20
    assert bool((layer.input_layernorm.weight == 1).all())
    assert loaded.source.startswith("synthetic:smollm2-135m")
    logits = PagedRunner(loaded.model).step({0: [1, 2, 3, 4]})[0]
    assert logits.shape == (4, 49152) and torch.isfinite(logits).all()


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="synthetic preset"):
        load_model("no-such-model", torch.float32, torch.device("cpu"), with_tokenizer=False)
