"""Copying a MiniMax-Text-01 checkpoint's tensors into `MiniMaxForCausalLM`.

Names are the checkpoints' (`model.layers.3.block_sparse_moe.experts.5.w1.weight`, ...):
the model stacks the experts into [E, ...] tensors (w1 gate and w3 up fused as gate|up, w2
down), fuses the softmax layers' q/k/v into `qkv_proj` and keeps the lightning layers'
projections as they are. transformers' own stacked expert tensors (`mlp.experts.gate_up_proj`)
are accepted too. The lightning layers' decay buffers (`slope_rate`, `*_decay`) are
recomputed from the config, never read.
"""

from __future__ import annotations

import re

import torch

from model.minimax import MiniMaxForCausalLM
from model.weights import raise_if_missing

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_GATE_UP = {"w1": 0, "w3": 1}


class MiniMaxWeightLoader:
    """Tracks which parameter (slices) were written, to report anything missing."""

    def __init__(self, model: MiniMaxForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self.params = dict(model.named_parameters())
        self.written: set[str] = set()

    def _destination(self, name: str) -> tuple[str, torch.Tensor] | None:
        """(written key, destination tensor) or None for tensors that are not loaded."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight":
            head = self.model.lm_head
            return ("lm_head.weight", head.weight.data) if head is not None else None
        if not name.startswith("model."):
            raise KeyError(f"unexpected weight {name!r}")
        m = _LAYER_RE.match(name)
        if m is None:
            pname = name.removeprefix("model.")
            return self._param(pname), self.params[pname].data
        prefix, sub = f"layers.{m.group(1)}.", m.group(2)
        if sub.rpartition(".")[2] in _DECAY_BUFFERS:
            return None
        sub = sub.replace("block_sparse_moe.", "mlp.", 1)
        e = _EXPERT_RE.match(sub)
        if e is not None:
            expert, w = int(e.group(1)), e.group(2)
            if w == "w2":
                pname = prefix + "mlp.experts.down_proj"
                return f"{pname}#{expert}", self.params[pname].data[expert]
            i = self.config.intermediate_size
            pname = prefix + "mlp.experts.gate_up_proj"
            shard = _GATE_UP[w]
            return (f"{pname}#{expert}.{shard}",
                    self.params[pname].data[expert].narrow(0, shard * i, i))
        if sub in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):  # transformers' stack
            pname = prefix + sub
            shards = (".0", ".1") if "gate_up" in sub else ("",)
            self.written.update(f"{pname}#{x}{s}" for x in range(self.config.num_local_experts)
                                for s in shards)
            return self._param(pname), self.params[pname].data
        module, _, leaf = sub.rpartition(".")
        proj = module.removeprefix("self_attn.")
        if module.startswith("self_attn.") and proj in _QKV:
            c = self.config
            sizes = [c.q_size, c.kv_size, c.kv_size]
            shard = _QKV[proj]
            pname = f"{prefix}self_attn.qkv_proj.{leaf}"
            dest = self.params[self._param(pname)].data.narrow(0, sum(sizes[:shard]), sizes[shard])
            return f"{pname}#{shard}", dest
        pname = prefix + sub
        return self._param(pname), self.params[pname].data

    def _param(self, pname: str) -> str:
        if pname not in self.params:
            raise KeyError(f"checkpoint weight maps to unknown parameter {pname!r}")
        return pname

    @torch.no_grad()
    def load(self, name: str, tensor: torch.Tensor) -> None:
        target = self._destination(name)
        if target is None:
            return
        key, dest = target
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {name!r}: checkpoint {tuple(tensor.shape)}, "
                             f"model {tuple(dest.shape)}")
        dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))
        self.written.add(key)

    def expected(self) -> set[str]:
        keys: set[str] = set()
        E = self.config.num_local_experts
        for pname in self.params:
            if pname.endswith("experts.gate_up_proj"):
                keys.update(f"{pname}#{x}.{s}" for x in range(E) for s in (0, 1))
            elif pname.endswith("experts.down_proj"):
                keys.update(f"{pname}#{x}" for x in range(E))
            elif pname.endswith("self_attn.qkv_proj.weight") and self._is_softmax(pname):
                keys.update(f"{pname}#{s}" for s in range(3))
            else:
                keys.add(pname)
        return keys

    def _is_softmax(self, pname: str) -> bool:
        layer = int(pname.split(".")[1])
        return not self.config.is_linear_layer(layer)

    def check_complete(self) -> None:
        raise_if_missing(self.expected(), self.written)
