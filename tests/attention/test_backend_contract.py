"""The backend contract of attention/base.py: every registered backend declares what it can
do, the registry imports no backend until asked, and a hybrid forwards every capability of
its parts (the fused rotary store included) with the same logits as a single backend."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest
import torch

from attention.backends.hybrid import HybridBackend
from attention.backends.triton_backend import TritonBackend
from attention.base import AttentionBackend, AttentionConfig, BackendCapabilities
from attention.batch import ForwardBatch
from attention.registry import backend_factory, backend_names, build_attention_backend
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig
from model.llama import attention_config
from model.loader import empty_model
from model.presets import init_synthetic_weights, synthetic_config
from tests.model.hf_reference import PagedRunner


def _tiny_pool(layout: str = "nhd") -> KVPool:
    page = 1 if layout == "token" else 4
    kv_layout = KVLayout.create(layout, page, 2, 16, "torch.float32")
    return KVPool(KVPoolConfig(kv_layout, 1, 8, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("name", backend_names())
def test_every_registered_backend_declares_its_capabilities(name: str) -> None:
    cls = backend_factory(name)
    assert isinstance(cls, type) and issubclass(cls, AttentionBackend)
    # declared by the class itself, not inherited by accident from a parent backend
    assert isinstance(cls.__dict__.get("capabilities"), BackendCapabilities), name
    caps = cls.capabilities
    if caps.fused_rope_store:  # a fused store means its own forward_rope
        assert cls.forward_rope is not AttentionBackend.forward_rope, name
    if caps.cuda_graphs:  # a graph-capable backend keys its graphs by its own plan
        assert cls.graph_key is not AttentionBackend.graph_key, name
    pool = _tiny_pool()
    backend = cls(AttentionConfig(num_q_heads=4, num_kv_heads=2, head_dim=16, scale=0.25), pool)
    assert backend.capabilities == caps


def test_importing_the_contract_imports_no_backend() -> None:
    code = ("import sys, attention, attention.base, attention.registry; "
            "print(sorted(m for m in sys.modules if m.startswith('attention.backends')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="reference"):
        backend_factory("no-such-backend")


@pytest.fixture(scope="module")
def tiny_model():
    cfg = dataclasses.replace(
        synthetic_config("llama3-8b"), vocab_size=128, hidden_size=64, intermediate_size=96,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
    )
    model = empty_model(cfg, torch.float32, torch.device("cpu"))
    init_synthetic_weights(model, random.randrange(1000), std=0.2)
    return model


def _run_mixed(runner: PagedRunner, seqs: dict[int, list[int]]) -> list[dict[int, torch.Tensor]]:
    """A prefill step, then a mixed step: two decodes and one prefill chunk."""
    return [runner.step({0: seqs[0][:12], 1: seqs[1][:9]}),
            runner.step({0: seqs[0][12:13], 1: seqs[1][9:10], 2: seqs[2]})]


@pytest.mark.parametrize("prefill,decode", [("reference", "triton"), ("triton", "reference")])
def test_hybrid_uses_the_fused_rotary_store_of_its_part(tiny_model, prefill, decode, monkeypatch):
    rng = random.Random()
    seqs = {s: [rng.randrange(128) for _ in range(n)] for s, n in enumerate([13, 10, 7])}
    calls: list[int] = []
    fused = TritonBackend.forward_rope

    def counting(self, q, k, v, rope, layer):
        calls.append(q.shape[0])
        return fused(self, q, k, v, rope, layer)

    monkeypatch.setattr(TritonBackend, "forward_rope", counting)
    results = {}
    for name in ("reference", "triton", "hybrid"):
        runner = PagedRunner(tiny_model, "hnd", 4)
        if name == "hybrid":
            runner.backend = build_attention_backend(
                runner.backend.config, runner.pool, "reference", prefill, decode)
            assert isinstance(runner.backend, HybridBackend)
            assert runner.backend.capabilities.fused_rope_store
            assert runner.backend.capabilities.cuda_graphs == (decode == "triton")
            calls.clear()
        elif name == "triton":
            runner.backend = TritonBackend(runner.backend.config, runner.pool)
        results[name] = _run_mixed(runner, seqs)
    # the triton part rotated and stored its own tokens: every layer of both steps
    # (prefill part: the 21-token prefill and the 7-token chunk; decode part: 2 tokens)
    layers = tiny_model.config.num_layers
    expected = [21, 7] if prefill == "triton" else [2]
    assert sorted(calls) == sorted(expected * layers)
    for ref_step, hyb_step, tri_step in zip(*results.values(), strict=True):
        for s in ref_step:
            torch.testing.assert_close(hyb_step[s], ref_step[s], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(hyb_step[s], tri_step[s], rtol=1e-4, atol=1e-4)


def test_hybrid_forwards_graph_contract_to_its_decode_part() -> None:
    pool = _tiny_pool()
    cfg = attention_config(dataclasses.replace(synthetic_config("llama3-8b"), num_heads=4,
                                               num_kv_heads=2, head_dim=16))
    hybrid = build_attention_backend(cfg, pool, "reference", decode_backend="triton")
    assert isinstance(hybrid, HybridBackend)
    triton = hybrid.decode
    assert hybrid.cuda_graph_context_lengths(4096) == triton.cuda_graph_context_lengths(4096)
    tables = [[1] * 226, [2] * 226]  # plan reads only host lists: page ids need not be real
    batch = ForwardBatch.build([1, 1], [700, 900], tables, 4, torch.device("cpu"))
    hybrid.plan(batch, graph_mode=True)
    assert hybrid.graph_key() == triton.graph_key() == triton.num_splits
    assert triton.graph_mode and triton.num_splits & (triton.num_splits - 1) == 0


@pytest.mark.parametrize("name", backend_names("latent"))
def test_every_latent_backend_declares_its_capabilities(name: str) -> None:
    """The MLA backends keep the same contract, over a latent pool and an MLAConfig; a K/V
    config or pool is refused."""
    from attention.mla.base import MLABackend, MLAConfig
    from kvcache.cache_spec import LatentSpec

    cls = backend_factory(name, "latent")
    assert isinstance(cls, type) and issubclass(cls, MLABackend)
    assert isinstance(cls.__dict__.get("capabilities"), BackendCapabilities), name
    if cls.capabilities.fused_rope_store:
        assert cls.forward_rope is not MLABackend.forward_rope, name
    if cls.capabilities.cuda_graphs:
        assert cls.graph_key is not AttentionBackend.graph_key, name
    spec = LatentSpec(32, 16)
    pool = spec.build_pool(spec.make_layout("nhd", 4, "float32"), 1, 8, torch.float32,
                           torch.device("cpu"))
    config = MLAConfig.create(4, 32, 16, 0.2)
    assert cls(config, pool).capabilities == cls.capabilities
    with pytest.raises(TypeError, match="MLAConfig"):
        cls(AttentionConfig(num_q_heads=4, num_kv_heads=1, head_dim=48, scale=0.2), pool)
    with pytest.raises(ValueError, match="does not support KV layout"):
        cls(config, _tiny_pool())  # type: ignore[arg-type]
