"""Small random Qwen2 / Qwen3 / Llama-3 models saved as Hugging Face folders (safetensors),
loaded through our loader, must give transformers' teacher-forced logits (float32)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model.loader import load_model
from tests.model.hf_reference import PagedRunner, hf_logits
from tests.model.test_logits_vs_hf import TOLERANCE, teacher_forced_check

COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def _build(kind: str):
    import transformers as tf

    if kind == "qwen2":
        cfg = tf.Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=False)
        return tf.Qwen2ForCausalLM(cfg)
    if kind == "qwen3":
        # head_dim 32 != hidden / heads: the explicit head_dim must be honoured.
        cfg = tf.Qwen3Config(**COMMON, head_dim=32, rope_theta=1000000.0,
                             tie_word_embeddings=True)
        return tf.Qwen3ForCausalLM(cfg)
    # Llama-3 rope scaling with a short original context so the scaling changes most bands.
    cfg = tf.LlamaConfig(
        **COMMON, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                      "rope_theta": 10000.0},
    )
    return tf.LlamaForCausalLM(cfg)


@torch.no_grad()
def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Larger than the default init so every weight (biases, q/k norms) visibly matters.
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 0.1
        p.copy_(1.0 + noise if name.endswith("norm.weight") else noise * 1.5)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama3"])
def test_hf_folder_matches_transformers(kind, tmp_path):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    hf = _build(kind).eval()
    _randomise(hf, gen)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert list(tmp_path.glob("*.safetensors"))
    ours = load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)
    cfg = ours.config
    saved = json.loads((tmp_path / "config.json").read_text())
    assert cfg.architecture == saved["architectures"][0]
    assert cfg.qkv_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.head_dim == (32 if kind == "qwen3" else 16)
    assert (cfg.rope_scaling is not None) == (kind == "llama3")
    layout, page = {"qwen2": ("hnd", 4), "qwen3": ("token", 1), "llama3": ("hnd_x", 8)}[kind]
    diff = teacher_forced_check(ours.model, hf, layout, page, random.Random())
    assert diff < TOLERANCE, f"max abs logit diff {diff}"


def test_bfloat16_load_tracks_float32(tmp_path):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    hf = _build("qwen3").eval()
    _randomise(hf, gen)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(str(tmp_path), torch.bfloat16, torch.device("cpu"), with_tokenizer=False)
    assert all(p.dtype == torch.bfloat16 for p in ours.model.parameters())
    ids = [random.randrange(320) for _ in range(24)]
    logits = PagedRunner(ours.model).step({0: ids})[0]
    ref = hf_logits(hf, ids)
    assert logits.dtype == torch.float32
    # bf16 keeps ~3 significant digits: compare relative to the logits' spread.
    tol = 0.05 * ref.abs().max()
    assert (logits - ref).abs().max() < tol
    # Greedy picks may differ only between near-ties of the float32 reference.
    picked = ref.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
    assert (picked >= ref.amax(-1) - 2 * tol).all()
