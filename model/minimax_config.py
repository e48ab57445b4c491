"""Hyperparameters of the MiniMax-Text-01 family: lightning (linear) attention layers
interleaved with softmax attention layers per `layer_types`, a Mixtral-style MoE feed-forward
in every layer, and per-layer residual factors (alpha on the normed input, beta on the
sublayer's output).

Read from a Hugging Face config.json (`MiniMaxForCausalLM`, transformers' keys) or from a
synthetic preset. The softmax layers are Llama attention (GQA, rotary over the whole head,
no biases), so the config extends `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvcache.cache_spec import CacheSpec, KVHeadsSpec, LinearStateSpec
from model.config import ModelConfig

MINIMAX_ARCHITECTURES = ("MiniMaxForCausalLM",)
LAYER_KINDS = ("full_attention", "linear_attention")


@dataclass
class MiniMaxConfig(ModelConfig):
    layer_types: list[str] = field(default_factory=list)
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    block_size: int = 256  # transformers' prefill block; the math does not depend on it
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0
    architecture: str = "MiniMaxForCausalLM"

    # the MoE router's settings, under the names model/moe.py reads (MiniMax routes like
    # Mixtral: softmax over every expert, the top k renormalised, no shared experts)
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layer_types:
            raise ValueError("a MiniMax config needs layer_types")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"unknown layer types {unknown} (known: {list(LAYER_KINDS)})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("num_experts_per_tok exceeds num_local_experts")

    # ---- the router's view (model/moe.py) ----------------------------------------------------
    @property
    def n_routed_experts(self) -> int:
        return self.num_local_experts

    @property
    def moe_intermediate_size(self) -> int:
        return self.intermediate_size

    # ---- layers -------------------------------------------------------------------------------
    def is_linear_layer(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    @property
    def softmax_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not self.is_linear_layer(i)]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_linear_layer(i)]

    def layer_cache_specs(self) -> list[CacheSpec]:
        kv = KVHeadsSpec(self.num_kv_heads, self.head_dim)
        state = LinearStateSpec(self.num_heads, self.head_dim)
        return [state if self.is_linear_layer(i) else kv for i in range(self.num_layers)]

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, E = self.hidden_size, self.intermediate_size, self.num_local_experts
        qd = self.num_heads * self.head_dim
        softmax_attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        linear_attn = h * 3 * qd + h * qd + qd * h + qd  # qkv, output gate, out, norm
        moe = E * 3 * h * i + E * h
        total = sum((linear_attn if self.is_linear_layer(n) else softmax_attn) + moe + 2 * h
                    for n in range(self.num_layers))
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + embed + h

    def active_parameters(self) -> int:
        """Parameters one token touches (routed experts: only its top k)."""
        idle = self.num_local_experts - self.num_experts_per_tok
        return self.num_parameters() - self.num_layers * idle * 3 * self.hidden_size \
            * self.intermediate_size

    # ---- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MiniMaxConfig:  # type: ignore[override]
        arch = (d.get("architectures") or ["MiniMaxForCausalLM"])[0]
        if arch not in MINIMAX_ARCHITECTURES:
            raise ValueError(f"not a MiniMax architecture: {arch!r}")
        if d.get("sliding_window") is not None:
            raise ValueError("MiniMax configs with sliding_window are not supported yet")
        if (d.get("hidden_act") or "silu") != "silu":
            raise ValueError(f"MiniMax hidden_act {d.get('hidden_act')!r}: only silu is supported")
        base = ModelConfig.from_hf_dict({**d, "architectures": ["LlamaForCausalLM"]})
        rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError("MiniMax configs with scaled rotary are not supported")
        fields = {name: getattr(base, name) for name in ModelConfig.__dataclass_fields__}
        fields["architecture"] = arch
        return cls(
            **fields,
            layer_types=list(d["layer_types"]),
            num_local_experts=d.get("num_local_experts", 8),
            num_experts_per_tok=d.get("num_experts_per_tok", 2),
            block_size=d.get("block_size", 256),
            linear_attn_alpha_factor=float(d.get("linear_attn_alpha_factor", 1.0)),
            linear_attn_beta_factor=float(d.get("linear_attn_beta_factor", 1.0)),
            full_attn_alpha_factor=float(d.get("full_attn_alpha_factor", 1.0)),
            full_attn_beta_factor=float(d.get("full_attn_beta_factor", 1.0)),
            mlp_alpha_factor=float(d.get("mlp_alpha_factor", 1.0)),
            mlp_beta_factor=float(d.get("mlp_beta_factor", 1.0)),
        )
