"""DeepSeek-V2/V3 (MLA + MoE) loaded from saved Hugging Face folders must give transformers'
teacher-forced logits in float32, through the paged latent cache and the reference MLA
backend, on ragged steps (prefill chunks, decodes, extends)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvcache.latent_pool import LatentPool
from model.deepseek import DeepseekForCausalLM
from model.deepseek_config import DeepseekConfig
from model.loader import load_model
from tests.model.deepseek_tiny import VARIANTS, save_tiny
from tests.model.hf_reference import PagedRunner, hf_logits

REL_TOLERANCE = 1e-4


def _teacher_forced_rel_diff(model, hf, layout: str, page_size: int, rng: random.Random) -> float:
    seqs = {s: [rng.randrange(model.config.vocab_size) for _ in range(n)]
            for s, n in enumerate([37, 26, 5])}
    schedule = [{0: (0, 20), 1: (0, 17), 2: (0, 4)},
                {0: (20, 21), 2: (4, 5), 1: (17, 26)},
                {0: (21, 37)}]
    runner = PagedRunner(model, layout=layout, page_size=page_size)
    assert isinstance(runner.pool, LatentPool)
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
def test_deepseek_folder_matches_transformers(variant, tmp_path):
    hf = save_tiny(variant, tmp_path, random.randrange(2**31))
    loaded = load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)
    assert isinstance(loaded.model, DeepseekForCausalLM)
    cfg = loaded.config
    assert isinstance(cfg, DeepseekConfig)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert cfg.architecture == saved["architectures"][0]
    assert cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    assert sum(p.numel() for p in loaded.model.parameters()) == cfg.num_parameters()
    layout, page = ("token", 1) if variant.startswith("v2") else ("nhd", 16)
    diff = _teacher_forced_rel_diff(loaded.model, hf, layout, page, random.Random())
    assert diff < REL_TOLERANCE, f"max relative logit diff {diff}"


def test_missing_expert_weight_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny("v3", tmp_path, 0)
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.gate_up_proj#5.1"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"), with_tokenizer=False)
