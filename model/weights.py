"""Copying Hugging Face-named tensors into `CausalLM`'s (partly fused) parameters.

Every weight source (safetensors, GGUF after renaming) yields tensors under the Hugging Face
Llama names (`model.layers.3.self_attn.q_proj.weight`, ...); this module places each one,
slicing q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.
"""

from __future__ import annotations

import re

import torch

from model.llama import CausalLM

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# HF sub-name -> (our sub-name, shard index in the fused tensor or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def raise_if_missing(expected: set[str], written: set[str]) -> None:
    """ValueError naming (up to 8 of) the expected weights no checkpoint tensor wrote."""
    missing = sorted(expected - written)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")


class WeightLoader:
    """Tracks which parameter (slices) have been written, to report anything missing."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.written: set[str] = set()  # "param_name" or "param_name#shard"
        cfg = model.config
        self.qkv_sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        self.gate_up_sizes = [cfg.intermediate_size, cfg.intermediate_size]

    def _target(self, name: str) -> tuple[str, int | None] | None:
        if name == "lm_head.weight":
            return ("lm_head.weight", None) if self.model.lm_head is not None else None
        if not name.startswith("model."):
            raise KeyError(f"unexpected weight {name!r}")
        m = _LAYER_RE.match(name)
        if m is None:
            return name.removeprefix("model."), None
        idx, rest = m.group(1), m.group(2)
        module, _, leaf = rest.rpartition(".")
        if module in _FUSED:
            ours, shard = _FUSED[module]
            return f"layers.{idx}.{ours}.{leaf}", shard
        return f"layers.{idx}.{rest}", None

    @torch.no_grad()
    def load(self, name: str, tensor: torch.Tensor) -> None:
        dest = self.destination(name, tuple(tensor.shape))
        if dest is not None:
            dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))

    def destination(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The parameter (slice) that checkpoint tensor `name` of `shape` fills, marked as
        written: the caller writes it (a GGUF tensor is dequantized straight into it). None
        for tensors that are not loaded."""
        if name.endswith("rotary_emb.inv_freq"):
            return None  # recomputed from the config
        target = self._target(name)
        if target is None:
            return None  # e.g. an lm_head duplicated from tied embeddings
        pname, shard = target
        if pname not in self.params:
            raise KeyError(f"weight {name!r} maps to unknown parameter {pname!r}")
        dest = self.params[pname].data
        if shard is not None:
            sizes = self.qkv_sizes if "qkv_proj" in pname else self.gate_up_sizes
            start = sum(sizes[:shard])
            dest = dest.narrow(0, start, sizes[shard])
        if tuple(dest.shape) != tuple(shape):
            raise ValueError(
                f"shape mismatch for {name!r}: checkpoint {tuple(shape)}, "
                f"model {tuple(dest.shape)}"
            )
        self.written.add(pname if shard is None else f"{pname}#{shard}")
        return dest

    def check_complete(self) -> None:
        expected: set[str] = set()
        for pname in self.params:
            if "qkv_proj" in pname:
                expected.update(f"{pname}#{i}" for i in range(3))
            elif "gate_up_proj" in pname:
                expected.update(f"{pname}#{i}" for i in range(2))
            else:
                expected.add(pname)
        raise_if_missing(expected, self.written)
