"""MiniMax-Text-01 (lightning + softmax layers, MoE) loaded from saved Hugging Face folders
must give transformers' teacher-forced logits in float32, through the paged KV cache, the
state pool and the reference backends, on ragged steps (prefill chunks, decodes, extends
that start inside and across the lightning ops' chunks)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from model.loader import load_model
from model.minimax import MiniMaxForCausalLM
from model.minimax_config import MiniMaxConfig
from tests.model.hf_reference import PagedRunner, hf_logits
from tests.model.minimax_tiny import VARIANTS, save_tiny

REL_TOLERANCE = 1e-4


def _teacher_forced_rel_diff(model, hf, layout: str, page_size: int, rng: random.Random) -> float:
    seqs = {s: [rng.randrange(model.config.vocab_size) for _ in range(n)]
            for s, n in enumerate([150, 26, 5])}
    # extends that start at 70 and end at 149 cross the reference's 64-token segments
    schedule = [{0: (0, 70), 1: (0, 17), 2: (0, 4)},
                {0: (70, 71), 2: (4, 5), 1: (17, 26)},
                {0: (71, 149)},
                {0: (149, 150)}]
    runner = PagedRunner(model, layout=layout, page_size=page_size, capacity_tokens=256)
    got: dict[int, list[torch.Tensor]] = {s: [] for s in seqs}
    for step in schedule:
        for s, logits in runner.step({s: seqs[s][a:b] for s, (a, b) in step.items()}).items():
            got[s].append(logits)
    worst = 0.0
    for s, ids in seqs.items():
        ours, ref = torch.cat(got[s]), hf_logits(hf, ids)
        assert ours.shape == ref.shape
        worst = max(worst, ((ours - ref).abs().max() / ref.abs().max()).item())
    return worst


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_minimax_folder_matches_transformers(variant, tmp_path):
    hf = save_tiny(variant, tmp_path, random.randrange(2**31))
    loaded = load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)
    assert isinstance(loaded.model, MiniMaxForCausalLM)
    cfg = loaded.config
    assert isinstance(cfg, MiniMaxConfig)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert cfg.layer_types == saved["layer_types"]
    assert sum(p.numel() for p in loaded.model.parameters()) == cfg.num_parameters()
    layout, page = ("token", 1) if variant == "alternating" else ("nhd", 16)
    diff = _teacher_forced_rel_diff(loaded.model, hf, layout, page, random.Random())
    assert diff < REL_TOLERANCE, f"max relative logit diff {diff}"


def test_missing_expert_weight_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny("alternating", tmp_path, 0)
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.2.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.gate_up_proj#3.1"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)


def test_lightning_output_gate_and_norm_matter(tmp_path):
    """A model whose lightning layers skip the gate would still pass a loose check: the
    gate's weights are perturbed here and the logits must move."""
    save_tiny("three-to-one", tmp_path, 1)
    loaded = load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)
    model = loaded.model
    ids = list(range(1, 40))
    base = PagedRunner(model).step({0: ids})[0]
    with torch.no_grad():
        model.layers[0].self_attn.output_gate.weight.mul_(-1.0)
    moved = PagedRunner(model).step({0: ids})[0]
    assert (moved - base).abs().max() > 1e-2
