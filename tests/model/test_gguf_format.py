"""model/gguf_format.py against the `gguf` package: a small file written by gguf.GGUFWriter
(metadata of every kind, tensors of each block format we decode and one we leave to
gguf) reads back the same through GGUFContainer as through gguf.GGUFReader +
gguf.quants.dequantize; and the Q/K row order matches llama.cpp's permutation."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from model.gguf_format import GGUFContainer
from model.gguf_weights import unpermuted_row_order

Q = gguf.GGMLQuantizationType


def _blocks(rng: np.random.Generator, rows: int, blocks_per_row: int, qtype: Q) -> np.ndarray:
    """Random but valid blocks: float16 scales, random quant bytes."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, blocks_per_row, size), dtype=np.uint8)
    n_halves = {Q.Q4_0: 1, Q.Q8_0: 1, Q.Q4_1: 2, Q.Q5_0: 1}[qtype]
    halves = rng.normal(0, 0.05, (rows, blocks_per_row, n_halves)).astype(np.float16)
    raw[:, :, : 2 * n_halves] = halves.view(np.uint8).reshape(rows, blocks_per_row, -1)
    return raw.reshape(rows, blocks_per_row * size)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("some.flag", True)
    w.add_int64("some.big", -(2**40))
    w.add_float64("some.double", 1.25)
    w.add_string("general.name", "tiny ünïcode")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bé", ""])
    w.add_array("some.ints", [1, -2, 3])
    w.add_tensor("f32", rng.normal(size=(3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(2, 32)).astype(np.float16))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):
        raw = _blocks(rng, 4, 2, qtype)
        w.add_tensor(qtype.name.lower(), raw, raw_dtype=qtype)  # 4 x 64 values
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_matches_gguf_reader(small_gguf: Path) -> None:
    ours = GGUFContainer(small_gguf)
    theirs = gguf.GGUFReader(str(small_gguf))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours.fields)
    for key in keys:
        assert ours.field(key) == theirs.fields[key].contents(), key
    assert ours.field_length("tokenizer.ggml.tokens") == 4
    assert ours.field("missing", "default") == "default"


def test_tensors_match_gguf_dequantize(small_gguf: Path) -> None:
    ours = GGUFContainer(small_gguf)
    theirs = gguf.GGUFReader(str(small_gguf))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for info, t in zip(ours.tensors, theirs.tensors, strict=True):
        expected = torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        ).reshape(info.shape)
        assert torch.equal(ours.dequantize(info), expected), info.name
        as_bf16 = torch.empty(info.shape, dtype=torch.bfloat16)
        ours.dequantize_into(info, as_bf16)
        assert torch.equal(as_bf16, expected.bfloat16()), info.name
        order = np.arange(info.shape[0])[::-1].copy()
        assert torch.equal(ours.dequantize(info, order), expected.flip(0)), info.name


def test_row_order_undoes_llama_cpp_permutation() -> None:
    heads, head_dim, cols = 3, 8, 5
    hf = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(-1, cols)
    # llama.cpp's converter: w.reshape(heads, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape)
    stored = hf.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(hf.shape)
    order = torch.from_numpy(unpermuted_row_order(heads * head_dim, heads))
    assert torch.equal(stored[order], hf)
