"""Copying a DeepSeek-V2/V3 checkpoint's tensors into `DeepseekForCausalLM`.

Names are the checkpoints' (`model.layers.3.mlp.experts.17.up_proj.weight`, ...); the model
fuses gate|up, stacks the routed experts into [E, ...] tensors, and holds the rotary rows of
the q and kv_a projections in half-split order instead of DeepSeek's interleaved pairs
(model/deepseek.py). transformers' own stacked expert tensors (`mlp.experts.gate_up_proj`)
are accepted too. Layers past `num_hidden_layers` (V3's multi-token-prediction module) are
not loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from model.deepseek import DeepseekForCausalLM
from model.weights import raise_if_missing

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# dense MLP / shared experts: HF sub-name -> (ours, shard of the fused gate|up)
_FUSED = {"gate_proj": 0, "up_proj": 1}

Transform = Callable[[torch.Tensor], torch.Tensor]


def deinterleave_rope_rows(weight: torch.Tensor, heads: int, nope: int, rope: int) -> torch.Tensor:
    """Rows of a projection whose output is `heads` x (nope | rope): each head's rope rows
    reordered from pairs (2i, 2i+1) to halves (even rows, then odd rows)."""
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    w = weight.reshape(heads, nope + rope, *weight.shape[1:])
    w = torch.cat([w[:, :nope], w[:, nope:][:, perm]], dim=1)
    return w.reshape(weight.shape)


class DeepseekWeightLoader:
    """Tracks which parameter (slices) were written, to report anything missing."""

    def __init__(self, model: DeepseekForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self.params = dict(model.named_parameters())
        self.written: set[str] = set()

    def _rope_transform(self, sub: str) -> Transform | None:
        c = self.config
        if not c.rope_interleave:
            return None
        if sub in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
            return lambda w: deinterleave_rope_rows(w, c.num_heads, c.qk_nope_head_dim,
                                                    c.qk_rope_head_dim)
        if sub in ("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias"):
            return lambda w: deinterleave_rope_rows(w, 1, c.kv_lora_rank, c.qk_rope_head_dim)
        return None

    def _destination(self, name: str) -> tuple[str, torch.Tensor, Transform | None] | None:
        """(written key, destination tensor, transform) or None for tensors not loaded."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight":
            head = self.model.lm_head
            return ("lm_head.weight", head.weight.data, None) if head is not None else None
        if not name.startswith("model."):
            raise KeyError(f"unexpected weight {name!r}")
        m = _LAYER_RE.match(name)
        if m is None:
            pname = name.removeprefix("model.")
            return self._param(pname), self.params[pname].data, None
        idx, sub = int(m.group(1)), m.group(2)
        if idx >= self.config.num_layers:
            return None  # multi-token-prediction layers
        prefix = f"layers.{idx}."
        e = _EXPERT_RE.match(sub)
        if e is not None:
            expert, proj = int(e.group(1)), e.group(2)
            i = self.config.moe_intermediate_size
            if proj == "down_proj":
                pname = prefix + "mlp.experts.down_proj"
                return f"{pname}#{expert}", self.params[pname].data[expert], None
            pname = prefix + "mlp.experts.gate_up_proj"
            shard = _FUSED[proj]
            dest = self.params[pname].data[expert].narrow(0, shard * i, i)
            return f"{pname}#{expert}.{shard}", dest, None
        if sub in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # transformers' stack
            pname = prefix + sub
            E = self.config.n_routed_experts
            shards = [f".{s}" for s in (0, 1)] if "gate_up" in sub else [""]
            self.written.update(f"{pname}#{x}{s}" for x in range(E) for s in shards)
            return self._param(pname), self.params[pname].data, None
        module, _, leaf = sub.rpartition(".")
        base, _, proj = module.rpartition(".")
        if proj in _FUSED and base in ("mlp", "mlp.shared_experts"):
            pname = f"{prefix}{base}.gate_up_proj.{leaf}"
            size = self.params[pname].shape[0] // 2
            dest = self.params[pname].data.narrow(0, _FUSED[proj] * size, size)
            return f"{pname}#{_FUSED[proj]}", dest, None
        pname = prefix + sub
        return self._param(pname), self.params[pname].data, self._rope_transform(sub)

    def _param(self, pname: str) -> str:
        if pname not in self.params:
            raise KeyError(f"checkpoint weight maps to unknown parameter {pname!r}")
        return pname

    @torch.no_grad()
    def load(self, name: str, tensor: torch.Tensor) -> None:
        target = self._destination(name)
        if target is None:
            return
        key, dest, transform = target
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                             f"model {tuple(dest.shape)}")
        if transform is not None:
            tensor = transform(tensor)
        dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))
        self.written.add(key)

    def expected(self) -> set[str]:
        keys: set[str] = set()
        E = self.config.n_routed_experts
        for pname in self.params:
            if pname.endswith("experts.gate_up_proj"):
                keys.update(f"{pname}#{x}.{s}" for x in range(E) for s in (0, 1))
            elif pname.endswith("experts.down_proj"):
                keys.update(f"{pname}#{x}" for x in range(E))
            elif "gate_up_proj" in pname:
                keys.update(f"{pname}#{s}" for s in (0, 1))
            else:
                keys.add(pname)
        return keys

    def check_complete(self) -> None:
        raise_if_missing(self.expected(), self.written)
