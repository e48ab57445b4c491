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

    def reset(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """For each i: slot dst[i] := slot src[i] in every layer, or zeros where src[i] < 0
        (int64 device tensors; one gather and one scatter for the whole step)."""
        if dst.numel() == 0:
            return
        keep = (src >= 0).to(torch.float32).view(1, -1, 1, 1, 1)
        rows = self.states.index_select(1, src.clamp(min=0)) * keep
        self.states.index_copy_(1, dst, rows)


def slots_for_bytes(spec: LinearStateSpec, num_layers: int, memory_bytes: int) -> int:
    """State slots (scratch included) that fit in `memory_bytes`."""
    return max(2, memory_bytes // (spec.state_bytes() * num_layers))
