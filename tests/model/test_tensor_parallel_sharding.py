"""Which part of each weight a tensor-parallel rank holds (model/parallel/sharding.py),
checked against the whole tensors: the ranks' parts put back together are the whole (or, for
replicated KV heads, each rank holds the head its query heads read), and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.llama import CausalLM
from model.parallel.group import TPGroup
from model.parallel.layers import TensorParallelCausalLM
from model.parallel.sharding import TensorParallelUnsupported, TPShard, check_splittable
from model.presets import init_synthetic_weights, synthetic_config

BASE = ModelConfig(vocab_size=1003, hidden_size=48, intermediate_size=96, num_layers=2,
                   num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=64)

# (query heads, KV heads, ranks): split, replicated (fewer KV heads than ranks), MHA,
# SmolLM2's 9/3 at 3 ranks
CASES = [(8, 2, 2), (8, 2, 4), (8, 1, 2), (8, 8, 4), (9, 3, 3), (4, 1, 4)]


def _config(heads: int, kv: int) -> ModelConfig:
    return dataclasses.replace(BASE, num_heads=heads, num_kv_heads=kv)


@pytest.mark.parametrize("heads,kv,size", CASES)
def test_checkpoint_parts_put_back_together_are_the_whole(heads, kv, size):
    cfg = _config(heads, kv)
    d, h = cfg.head_dim, cfg.hidden_size
    g = torch.Generator().manual_seed(heads * 100 + kv * 10 + size)
    whole = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(heads * d, h, generator=g),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(kv * d, h, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(h, heads * d, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(cfg.intermediate_size, h, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(h, cfg.intermediate_size,
                                                           generator=g),
        "model.embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g),
        "model.norm.weight": torch.randn(h, generator=g),
    }
    shards = [TPShard(cfg, r, size) for r in range(size)]
    parts = {n: [s.checkpoint_part(n, t) for s in shards] for n, t in whole.items()}

    def joined(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat(parts[name], dim=dim)

    assert torch.equal(joined("model.layers.0.self_attn.q_proj.weight"),
                       whole["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(joined("model.layers.0.self_attn.o_proj.weight", 1),
                       whole["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(joined("model.layers.0.mlp.up_proj.weight"),
                       whole["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(joined("model.layers.0.mlp.down_proj.weight", 1),
                       whole["model.layers.0.mlp.down_proj.weight"])
    # every rank's query head j reads, in its own KV part, the head the whole model pairs it
    # with (head // group): split or replicated
    k = whole["model.layers.0.self_attn.k_proj.weight"].view(kv, d, h)
    group = heads // kv
    for s, part in zip(shards, parts["model.layers.0.self_attn.k_proj.weight"], strict=True):
        local = part.view(s.num_kv_heads, d, h)
        local_group = s.num_heads // s.num_kv_heads
        for j in range(s.num_heads):
            assert torch.equal(local[j // local_group], k[(s.first_head + j) // group])
    if kv >= size:
        assert torch.equal(joined("model.layers.0.self_attn.k_proj.weight"),
                           whole["model.layers.0.self_attn.k_proj.weight"])
    table = joined("model.embed_tokens.weight")
    assert table.shape[0] == size * shards[0].vocab_per_rank
    assert torch.equal(table[: cfg.vocab_size], whole["model.embed_tokens.weight"])
    assert not table[cfg.vocab_size :].any()  # padding rows
    assert all(torch.equal(p, whole["model.norm.weight"]) for p in parts["model.norm.weight"])


@pytest.mark.parametrize("heads,kv,size", [(8, 2, 2), (8, 1, 4)])
def test_sharded_synthetic_weights_are_the_unsplit_models_draws(heads, kv, size):
    """A synthetic preset is the same model at every TP size: each rank's parameters are its
    part of the unsplit model's seeded draws (no collective runs while building)."""
    cfg = _config(heads, kv)
    whole = CausalLM(cfg).requires_grad_(False)
    init_synthetic_weights(whole, seed=7)
    expected = dict(whole.named_parameters())
    for rank in range(size):
        shard = TPShard(cfg, rank, size)
        model = TensorParallelCausalLM(shard, TPGroup(rank, size, torch.device("cpu")))
        model.requires_grad_(False)
        init_synthetic_weights(model, seed=7, shard=shard)
        names = [n for n, _ in model.named_parameters()]
        assert names == list(expected)  # same parameters, same order of draws
        for name, param in model.named_parameters():
            assert torch.equal(param, shard.param_part(name, expected[name])), name
        assert model.config.num_heads == heads // size
        assert model.config.vocab_size == cfg.vocab_size


def test_what_does_not_split_is_refused_with_the_reason():
    with pytest.raises(TensorParallelUnsupported, match="DeepseekV2ForCausalLM models are not"):
        check_splittable(synthetic_config("deepseek-v2-lite"), 2)
    with pytest.raises(TensorParallelUnsupported, match="9 query heads do not divide into 2"):
        check_splittable(_config(9, 3), 2)
    with pytest.raises(TensorParallelUnsupported, match="not a multiple of the 3 KV heads"):
        check_splittable(dataclasses.replace(_config(12, 3), intermediate_size=96), 4)
    with pytest.raises(TensorParallelUnsupported, match="MLP width 90"):
        check_splittable(dataclasses.replace(BASE, intermediate_size=90), 4)
    check_splittable(synthetic_config("deepseek-v2-lite"), 1)  # unsplit: anything goes
    check_splittable(synthetic_config("llama3-70b"), 8)
