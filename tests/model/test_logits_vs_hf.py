"""Teacher-forced logits of our model (paged KV, reference backend) vs transformers, float32."""

from __future__ import annotations

import random

import pytest
import torch

from model.gguf_weights import embedded_smollm2_path
from model.loader import load_model
from tests.model.hf_reference import PagedRunner, hf_logits, hf_model_from_gguf

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def smollm2_pair():
    ours = load_model(None, torch.float32, torch.device("cpu"), with_tokenizer=False)
    hf = hf_model_from_gguf(embedded_smollm2_path())
    return ours, hf


def teacher_forced_check(model, hf, layout: str, page_size: int, rng: random.Random) -> float:
    """Three sequences fed in ragged steps (prefill chunks, decodes, extends) must give the
    logits transformers gives for each full sequence in one pass."""
    vocab = model.config.vocab_size
    seqs = {s: [rng.randrange(vocab) for _ in range(n)] for s, n in enumerate([37, 26, 5])}
    # (sequence -> [start, end)) for each step
    schedule = [
        {0: (0, 20), 1: (0, 17), 2: (0, 4)},
        {0: (20, 21), 2: (4, 5), 1: (17, 26)},
        {0: (21, 37)},
    ]
    runner = PagedRunner(model, layout=layout, page_size=page_size)
    got: dict[int, list[torch.Tensor]] = {s: [] for s in seqs}
    for step in schedule:
        out = runner.step({s: seqs[s][a:b] for s, (a, b) in step.items()})
        for s, logits in out.items():
            got[s].append(logits)
    worst = 0.0
    for s, ids in seqs.items():
        ours = torch.cat(got[s])
        ref = hf_logits(hf, ids)
        assert ours.shape == ref.shape
        assert ours.dtype == torch.float32
        worst = max(worst, (ours - ref).abs().max().item())
    return worst


def test_smollm2_gguf_matches_transformers(smollm2_pair):
    ours, hf = smollm2_pair
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    diff = teacher_forced_check(ours.model, hf, "nhd", 16, random.Random())
    assert diff < TOLERANCE, f"max abs logit diff {diff}"
