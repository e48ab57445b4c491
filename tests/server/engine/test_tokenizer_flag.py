"""`--tokenizer`: serve a model (here a synthetic preset) with a tokenizer from elsewhere."""

from __future__ import annotations

import pytest

from model.loader import embedded_tokenizer, load_tokenizer
from scheduler.request import SamplingParams
from server.cli import build_parser
from server.engine import EngineConfig, EngineCore
from server.engine.args import engine_config_from_args


def test_tokenizer_folder_and_gguf_load_the_same_tokenizer(tmp_path):
    embedded = embedded_tokenizer()
    embedded.hf.save_pretrained(str(tmp_path / "tok"))
    from model.gguf_weights import embedded_smollm2_path

    text = "The capital of France is Paris. ünïcödé 🚀"
    for spec in (str(tmp_path / "tok"), str(embedded_smollm2_path())):
        tok = load_tokenizer(spec)
        assert tok.encode(text) == embedded.encode(text)
    with pytest.raises(ValueError, match="neither a tokenizer folder nor a .gguf"):
        load_tokenizer(str(tmp_path / "missing"))


def test_engine_uses_the_given_tokenizer(tmp_path):
    embedded_tokenizer().hf.save_pretrained(str(tmp_path / "tok"))
    args = build_parser().parse_args(
        ["generate", "hi", "--model", "smollm2-135m", "--tokenizer", str(tmp_path / "tok")])
    config = engine_config_from_args(args)
    assert config.tokenizer == str(tmp_path / "tok")
    engine = EngineCore(EngineConfig(model="smollm2-135m", tokenizer=config.tokenizer,
                                     device="cpu", kv_cache_tokens=1024))
    assert engine.tokenizer.hf.name_or_path == str(tmp_path / "tok")
    engine.add_request(engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=2,
                                                                       ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert sum(len(o.new_token_ids) for o in outputs) == 2
