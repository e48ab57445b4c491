"""Weights of one tensor-parallel rank: checkpoint tensors sliced to its shard, and
synthetic weights drawn whole (as the unsplit model draws them) and sliced, so a synthetic
preset is the same model at every tensor-parallel size."""

from __future__ import annotations

import torch

from model.parallel.layers import TensorParallelCausalLM
from model.presets import init_synthetic_weights
from model.weights import WeightLoader


class ShardedWeightLoader(WeightLoader):
    """`load(name, whole tensor)`: this rank's part of it into the rank's parameters."""

    def __init__(self, model: TensorParallelCausalLM) -> None:
        super().__init__(model)
        self.shard = model.shard

    @torch.no_grad()
    def load(self, name: str, tensor: torch.Tensor) -> None:
        super().load(name, self.shard.checkpoint_part(name, tensor))


def init_sharded_synthetic_weights(model: TensorParallelCausalLM, seed: int) -> None:
    """The unsplit model's seeded draws (model/presets.py), each drawn whole on the rank's
    device and sliced to its part."""
    init_synthetic_weights(model, seed, shard=model.shard)
