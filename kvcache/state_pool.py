"""The linear-attention state pool: float32 [layers, slots, heads, head_dim, head_dim].

Slot s of layer l is one request's (or one prefix snapshot's) state for linear layer l;
every linear layer of a request uses the same slot id (kvcache/state_slots.py hands them
out). States stay float32 whatever the model's dtype: they are sums over the whole
sequence, and rounding them every token would drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.cache_spec import LinearStateSpec


@dataclass
class StatePool:
    spec: LinearStateSpec
    num_layers: int
    num_slots: int  # the scratch slot included
    device: torch.device

    def __post_init__(self) -> None:
        s = self.spec
        self.states = torch.zeros(self.num_layers, self.num_slots, s.num_heads, s.head_dim,
                                  s.head_dim, dtype=torch.float32, device=self.device)

    def layer(self, index: int) -> torch.Tensor:
        """[slots, heads, head_dim, head_dim] of linear layer `index` (a view)."""
        return self.states[index]

    @property
    def nbytes(self) -> int:
        return self.states.numel() * 4

    def reset(self, zero: torch.Tensor, copy_dst: torch.Tensor, copy_src: torch.Tensor) -> None:
        """Slots `zero` := zeros and slot copy_dst[i] := slot copy_src[i], in every layer
        (int64 device tensors). Copies go a layer at a time: a temporary of the copied
        slots of one layer, not of all layers (70 layers of 64 x 128 x 128 are 280 MiB a
        slot)."""
        if zero.numel():
            self.states.index_fill_(1, zero, 0.0)
        if copy_dst.numel():
            for layer in self.states:
                layer.index_copy_(0, copy_dst, layer.index_select(0, copy_src))
