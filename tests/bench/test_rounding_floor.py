"""The rounding-floor experiment (bench/rounding_floor.py) on a tiny model."""

import json

import pytest
import torch

from bench import rounding_floor


def test_every_mode_is_close_to_exact_and_some_differ(tmp_path):
    out = tmp_path / "floor.json"
    args = ["--layers", "2", "--width", "64", "--heads", "4", "--tokens", "24", "--vocab", "128"]
    assert rounding_floor.main([*args, "--seeds", "0,1", "--json-out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{m}/seed{s}" for m in rounding_floor.MODES for s in (0, 1)}
    # Every mode is a correct attention: close to exact, but rounding makes them differ.
    for errors in results.values():
        assert 0 <= errors["mean_rel_err"] <= errors["max_rel_err"] < 0.05
    assert max(errors["max_rel_err"] for errors in results.values()) > 0


def test_exact_run_is_deterministic_and_unknown_mode_rejected():
    model = rounding_floor._model(layers=2, width=64, vocab=128, seed=3)
    tokens = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(3))
    first = rounding_floor._logits(model, tokens, 4, "exact")
    assert torch.equal(first, rounding_floor._logits(model, tokens, 4, "exact"))
    with pytest.raises(ValueError):
        rounding_floor._logits(model, tokens, 4, "fp8p")
