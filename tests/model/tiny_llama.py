"""A tiny random Llama saved as a Hugging Face folder (config.json + safetensors), written
without transformers: the tensor-parallel tests load it at several sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tiny_llama(folder: Path, *, vocab: int = 1003, hidden: int = 64,
                     intermediate: int = 96, layers: int = 2, heads: int = 4, kv_heads: int = 1,
                     head_dim: int = 16, seed: int = 0) -> Path:
    """Random weights of a Llama of these shapes (untied LM head) into `folder`. The default
    vocabulary (1003) does not divide by 2 or 4, so vocab-parallel shards carry padding."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    tensors = {
        "model.embed_tokens.weight": rand(vocab, hidden, scale=0.5),
        "lm_head.weight": rand(vocab, hidden, scale=0.2),
        "model.norm.weight": 1 + rand(hidden, scale=0.1),
    }
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(q, hidden, scale=hidden**-0.5),
            p + "self_attn.k_proj.weight": rand(kv, hidden, scale=hidden**-0.5),
            p + "self_attn.v_proj.weight": rand(kv, hidden, scale=hidden**-0.5),
            p + "self_attn.o_proj.weight": rand(hidden, q, scale=q**-0.5),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden, scale=hidden**-0.5),
            p + "mlp.up_proj.weight": rand(intermediate, hidden, scale=hidden**-0.5),
            p + "mlp.down_proj.weight": rand(hidden, intermediate, scale=intermediate**-0.5),
            p + "input_layernorm.weight": 1 + rand(hidden, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + rand(hidden, scale=0.1),
        }
    config = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
