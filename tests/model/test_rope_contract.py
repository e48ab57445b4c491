"""The fused-rotary contract: a backend that declares `fused_rope_store` gets q/k unrotated
plus the cos|sin cache and must produce what the unfused path produces."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from attention.backends.reference import ReferenceBackend
from attention.base import BackendCapabilities
from model.llama import RotaryEmbedding
from model.loader import empty_model
from model.presets import init_synthetic_weights, synthetic_config
from tests.model.hf_reference import PagedRunner


class FusedRopeReference(ReferenceBackend):
    """Rotates with its own reading of the documented cache format, then the reference path."""

    capabilities = BackendCapabilities(fused_rope_store=True, cuda_graphs=False)
    calls = 0

    def forward_rope(self, q, k, v, rope, layer):
        type(self).calls += 1
        positions, cos_sin_cache = rope.positions, rope.cos_sin_cache
        half = q.shape[-1] // 2
        cos = cos_sin_cache[positions, :half][:, None, :]
        sin = cos_sin_cache[positions, half:][:, None, :]

        def rot(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., :half].double(), x[..., half:].double()
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

        return self.forward(rot(q), rot(k), v, layer)


@pytest.mark.parametrize("preset", ["llama3-8b", "qwen3-8b", "qwen2.5-7b"])
def test_fused_rope_path_matches_unfused(preset):
    cfg = dataclasses.replace(
        synthetic_config(preset), vocab_size=128, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
    )
    model = empty_model(cfg, torch.float32, torch.device("cpu"))
    init_synthetic_weights(model, random.randrange(1000), std=0.2)
    rng = random.Random()
    seqs = {s: [rng.randrange(cfg.vocab_size) for _ in range(n)] for s, n in enumerate([40, 9])}
    plain = PagedRunner(model, "hnd", 8)
    fused = PagedRunner(model, "hnd", 8)
    fused.backend = FusedRopeReference(plain.backend.config, fused.pool)
    FusedRopeReference.calls = 0
    for runner in (plain, fused):
        runner.results = [runner.step({0: seqs[0][:30], 1: seqs[1][:8]}),
                          runner.step({1: seqs[1][8:], 0: seqs[0][30:]})]
    assert FusedRopeReference.calls == 2 * cfg.num_layers
    for step_plain, step_fused in zip(plain.results, fused.results, strict=True):
        for s in step_plain:
            torch.testing.assert_close(step_fused[s], step_plain[s], rtol=1e-4, atol=1e-4)


def test_rotary_rotate_matches_the_documented_formula():
    cfg = synthetic_config("llama3-8b")
    rotary = RotaryEmbedding(dataclasses.replace(cfg, max_position_embeddings=2048))
    x = torch.randn(5, 3, cfg.head_dim)
    pos = torch.tensor([0, 1, 17, 1000, 2047])
    half = cfg.head_dim // 2
    angles = pos[:, None].double() * rotary.inv_freq.double()[None, :]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    ref = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    torch.testing.assert_close(rotary.rotate(x, pos).double(), ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(rotary.rotate(x, torch.zeros(5, dtype=torch.long)), x)
