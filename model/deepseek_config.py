"""Hyperparameters of the DeepSeek-V2/V3 family: MLA attention, YaRN rotary, MoE feed-forward.

Read from a Hugging Face config.json (`DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM`, the
original keys or transformers' `rope_parameters`), or from a synthetic preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvcache.cache_spec import CacheSpec, LatentSpec

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
# (scoring function, top-k method) of the routers the configs name
TOPK_METHODS = {"greedy", "group_limited_greedy", "noaux_tc"}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term, 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class DeepseekConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: q projected directly (V2-Lite)
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0  # 0: every layer dense
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"  # V2 softmax, V3 sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN: {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    # "mscale_all_dim", "attention_factor"?}; None: plain rotary
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True  # rotary pairs (2i, 2i+1), as DeepSeek's checkpoints
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "DeepseekV2ForCausalLM"

    def __post_init__(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even for rotary embeddings")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"unsupported MoE topk_method {self.topk_method!r} "
                             f"(supported: {sorted(TOPK_METHODS)})")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported MoE scoring_func {self.scoring_func!r}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError("n_routed_experts must be a multiple of n_group")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError("num_experts_per_tok exceeds n_routed_experts")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind != "yarn":
                raise ValueError(f"unsupported rope_scaling type {kind!r} for DeepSeek "
                                 "(supported: yarn)")

    # ---- what the rest of the engine reads ------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_kv_heads(self) -> int:
        """In the latent view MLA is MQA: one shared latent "head" per token."""
        return 1

    @property
    def head_dim(self) -> int:
        """Width of that shared key: the latent plus the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0)

    def layer_cache_specs(self) -> list[CacheSpec]:
        return [LatentSpec(self.kv_lora_rank, self.qk_rope_head_dim)] * self.num_layers

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(mscale_all_dim)^2 when it is configured."""
        scale = self.qk_head_dim**-0.5
        s = self.rope_scaling
        if s is not None and s.get("mscale_all_dim"):
            m = yarn_mscale(self._yarn_factor(), float(s["mscale_all_dim"]))
            scale *= m * m
        return scale

    def _yarn_factor(self) -> float:
        s = self.rope_scaling or {}
        if s.get("factor") is not None:
            return float(s["factor"])
        return self.max_position_embeddings / float(s["original_max_position_embeddings"])

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, H = self.hidden_size, self.num_heads
        if self.q_lora_rank is None:
            q = h * H * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim))
        attn = q + kv + H * self.v_head_dim * h
        total = 0
        for layer in range(self.num_layers):
            if self.is_moe_layer(layer):
                i = self.moe_intermediate_size
                ffn = (self.n_routed_experts + self.n_shared_experts) * 3 * h * i
                ffn += self.n_routed_experts * h
                ffn += self.n_routed_experts if self.topk_method == "noaux_tc" else 0
            else:
                ffn = 3 * h * self.intermediate_size
            total += attn + ffn + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + embed + h

    def active_parameters(self) -> int:
        """Parameters one token touches (routed experts: only its top-k)."""
        h, i = self.hidden_size, self.moe_intermediate_size
        idle = self.n_routed_experts - self.num_experts_per_tok
        moe_layers = sum(self.is_moe_layer(n) for n in range(self.num_layers))
        return self.num_parameters() - moe_layers * idle * 3 * h * i

    # ---- config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DeepseekConfig:
        arch = (d.get("architectures") or ["DeepseekV2ForCausalLM"])[0]
        if arch not in DEEPSEEK_ARCHITECTURES:
            raise ValueError(f"not a DeepSeek-V2/V3 architecture: {arch!r}")
        if d.get("quantization_config"):
            method = d["quantization_config"].get("quant_method", "?")
            raise ValueError(f"quantized DeepSeek checkpoints ({method}) are not supported; "
                             "convert the weights to bf16 first")
        v3 = arch == "DeepseekV3ForCausalLM"
        rope_params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling") or (
            dict(rope_params) if rope_params.get("rope_type", "default") != "default" else None)
        eos = d.get("eos_token_id")
        topk_method = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        n_group = d.get("n_group") or 1
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"],
            qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"],
            q_lora_rank=d.get("q_lora_rank"),
            moe_intermediate_size=d.get("moe_intermediate_size") or 0,
            n_routed_experts=d.get("n_routed_experts") or 0,
            n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 1,
            first_k_dense_replace=d.get("first_k_dense_replace") or 0,
            moe_layer_freq=d.get("moe_layer_freq") or 1,
            scoring_func=d.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
            topk_method=topk_method,
            n_group=n_group,
            topk_group=d.get("topk_group") or n_group,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            routed_scaling_factor=float(d.get("routed_scaling_factor") or 1.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            rope_interleave=bool(d.get("rope_interleave", True)) if v3 else True,
            attention_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            architecture=arch,
        )
