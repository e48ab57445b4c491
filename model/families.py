"""Model families by architecture: which config, model class and weight loader a checkpoint's
`architectures` entry needs. The loader and presets dispatch here and nowhere else."""

from __future__ import annotations

from typing import Any

import torch

from attention.base import AttentionConfig
from attention.variants import Variant
from model.config import ModelConfig
from model.deepseek import DeepseekForCausalLM, mla_attention_config
from model.deepseek_config import DEEPSEEK_ARCHITECTURES, DeepseekConfig
from model.deepseek_weights import DeepseekWeightLoader
from model.llama import CausalLM, attention_config
from model.minimax import MiniMaxForCausalLM
from model.minimax_config import MINIMAX_ARCHITECTURES, MiniMaxConfig
from model.minimax_weights import MiniMaxWeightLoader
from model.weights import WeightLoader

AnyConfig = ModelConfig | DeepseekConfig  # MiniMaxConfig is a ModelConfig
AnyModel = CausalLM | DeepseekForCausalLM


def config_from_hf_dict(d: dict[str, Any]) -> AnyConfig:
    archs = d.get("architectures") or []
    if archs and archs[0] in DEEPSEEK_ARCHITECTURES:
        return DeepseekConfig.from_hf_dict(d)
    if archs and archs[0] in MINIMAX_ARCHITECTURES:
        return MiniMaxConfig.from_hf_dict(d)
    return ModelConfig.from_hf_dict(d)


def model_class(config: AnyConfig) -> type[AnyModel]:
    if isinstance(config, DeepseekConfig):
        return DeepseekForCausalLM
    return MiniMaxForCausalLM if isinstance(config, MiniMaxConfig) else CausalLM


def weight_loader(model: torch.nn.Module
                  ) -> WeightLoader | DeepseekWeightLoader | MiniMaxWeightLoader:
    if isinstance(model, DeepseekForCausalLM):
        return DeepseekWeightLoader(model)
    if isinstance(model, MiniMaxForCausalLM):
        return MiniMaxWeightLoader(model)
    assert isinstance(model, CausalLM)
    return WeightLoader(model)


def attention_config_for(config: AnyConfig, variant: Variant | None = None) -> AttentionConfig:
    """What the attention backend serving this model needs (MLA: softmax only)."""
    if isinstance(config, DeepseekConfig):
        if variant is not None and variant.name != "softmax":
            raise ValueError(f"--attention-variant {variant.name!r}: MLA models (DeepSeek) are "
                             "served with softmax attention only")
        return mla_attention_config(config)
    return attention_config(config, variant)
