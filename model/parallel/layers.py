"""The Llama family's decoder split over a tensor-parallel group.

`TensorParallelCausalLM` is `CausalLM` built from a rank's local config (its heads and MLP
columns, model/parallel/sharding.py), with four modules swapped for their parallel forms; the
layers' own code (model/llama.py) is unchanged:
- each layer's `o_proj` and `down_proj` are `RowParallelLinear`: the partial products are
  all-reduced, so every rank holds the whole residual stream after each;
- `embed_tokens` is a `VocabParallelEmbedding` (rows of other ranks' tokens are zero, then
  all-reduced);
- the LM head multiplies by this rank's vocabulary rows and all-gathers the logits.
Two all-reduces a layer plus one for the embedding: the forward pass's only communication,
all of it on the device's stream (captured into CUDA graphs with the rest of the forward).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from model.llama import CausalLM, DecoderLayer
from model.parallel.group import TPGroup
from model.parallel.sharding import TPShard


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T, where x_r and W_r are rank r's input columns."""

    def __init__(self, in_local: int, out_features: int, group: TPGroup,
                 dtype: torch.dtype) -> None:
        super().__init__(in_local, out_features, bias=False, dtype=dtype)
        self.tp = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Rank r holds rows [start, end) of the table (and zero rows of padding after them)."""

    def __init__(self, shard: TPShard, group: TPGroup, dtype: torch.dtype) -> None:
        super().__init__(shard.vocab_per_rank, shard.config.hidden_size, dtype=dtype)
        self.start, self.end = shard.vocab_start, shard.vocab_end
        self.tp = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        rows = F.embedding(torch.where(inside, ids - self.start, 0), self.weight)
        return self.tp.all_reduce(rows * inside[:, None].to(rows.dtype))


class TensorParallelCausalLM(CausalLM):
    """Rank `shard.rank`'s part of the model. `config` is the rank's local config (its
    heads, KV heads and MLP width; the whole vocabulary), as the runner, the KV pool and the
    attention backend see it."""

    def __init__(self, shard: TPShard, group: TPGroup,
                 dtype: torch.dtype = torch.float32) -> None:
        object.__setattr__(self, "_pending_tp", (shard, group, dtype))  # for make_layer
        local = shard.local_config()
        # Built with the rank's vocabulary rows, so no whole table is ever allocated.
        super().__init__(dataclasses.replace(local, vocab_size=shard.vocab_per_rank), dtype)
        object.__delattr__(self, "_pending_tp")
        self.config = local
        self.shard = shard
        self.tp = group
        self.embed_tokens = VocabParallelEmbedding(shard, group, dtype)

    def make_layer(self, config: object, index: int, dtype: torch.dtype) -> nn.Module:
        shard, group, _ = self._pending_tp
        layer = DecoderLayer(config, index, dtype)  # type: ignore[arg-type]
        hidden = shard.config.hidden_size
        layer.self_attn.o_proj = RowParallelLinear(shard.num_heads * shard.config.head_dim,
                                                   hidden, group, dtype)
        layer.mlp.down_proj = RowParallelLinear(shard.intermediate_size, hidden, group, dtype)
        return layer

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [rows, vocab] on every rank: each rank's rows, gathered."""
        logits = self.tp.all_gather_last_dim(
            self.logits_linear(hidden, self.logits_weight).float())
        vocab = self.shard.config.vocab_size
        return logits if logits.shape[-1] == vocab else logits[:, :vocab]
