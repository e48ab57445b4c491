"""The FP8 prefill path's dequantizing pass (attention/triton/fp8_prefill.py) under the CPU
interpreter: every layout's FP8 pages, with and without scales, become a 16-bit hnd
scratch whose rows equal torch's dequantization of the same codes rounded to the scratch
dtype, with zeros past each sequence's length; and the shape rule that picks the path."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.triton import fp8_prefill  # noqa: E402
from kvcache.kv_dtype import PER_TENSOR, PER_TOKEN_HEAD  # noqa: E402
from tests.attention.test_fp8_kernels import HEAD_DIM, NUM_KV_HEADS, Fp8Pages, _layout  # noqa: E402

LAYOUT_PAGES = [("token", 1), ("nhd", 4), ("hnd", 16), ("hnd_x", 16), ("hnd_x", 32)]


@pytest.mark.parametrize("scale_mode", [PER_TOKEN_HEAD, PER_TENSOR])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_dequantized_scratch_equals_torch(layout_name: str, page_size: int,
                                          scale_mode: str) -> None:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    layout = _layout(layout_name, page_size)
    seq_lens = [150, 3, 129]  # a scratch page and a bit, a few keys, one past a page
    pages = Fp8Pages(layout, seq_lens, scale_mode, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    width = fp8_prefill.scratch_width(layout, pages.table)
    assert width * fp8_prefill.SCRATCH_PAGE >= max(seq_lens)
    for dtype in (torch.bfloat16, torch.float16):
        for cache, scales, rows in ((pages.k_cache, pages.k_scales, pages.k),
                                    (pages.v_cache, pages.v_scales, pages.v)):
            out = fp8_prefill.dequantize_pages(cache, scales, layout, pages.table, lens, dtype)
            scratch = fp8_prefill.scratch_layout(layout, dtype)
            assert tuple(out.shape) == scratch.cache_shape(len(seq_lens) * width)
            # hnd pages [pages, heads, SCRATCH_PAGE, D] -> per sequence [tokens, heads, D]
            per_seq = out.view(len(seq_lens), width, NUM_KV_HEADS, fp8_prefill.SCRATCH_PAGE,
                               HEAD_DIM).permute(0, 1, 3, 2, 4).reshape(len(seq_lens), -1,
                                                                        NUM_KV_HEADS, HEAD_DIM)
            for b, n in enumerate(seq_lens):
                want = rows[b].to(dtype)  # float64 dequantized rows, rounded once
                got = per_seq[b, :n]
                if dtype == torch.float16:
                    assert torch.equal(got, want), f"{dtype} sequence {b}"
                else:  # the interpreter truncates float32 -> bf16 (the GPU rounds): one ulp
                    err = (got.double() - want.double()).abs()
                    assert bool((err <= want.double().abs() * 2.0**-7).all()), f"sequence {b}"
                assert not per_seq[b, n:].any(), "keys past the length must be zeros"


def test_scratch_block_table_and_path_choice() -> None:
    layout = _layout("nhd", 16)
    table = torch.zeros(3, 20, dtype=torch.int32)  # rows of 320 keys: 3 scratch pages each
    assert fp8_prefill.scratch_width(layout, table) == 3
    assert fp8_prefill.scratch_block_table(table, layout).tolist() == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert fp8_prefill.scratch_bytes(layout, table, torch.bfloat16) == \
        2 * 9 * fp8_prefill.SCRATCH_PAGE * NUM_KV_HEADS * HEAD_DIM * 2
    per_seq = fp8_prefill.MIN_QUERIES_PER_SEQ
    assert fp8_prefill.worth_it(3 * per_seq, layout, table, torch.bfloat16)
    assert not fp8_prefill.worth_it(3 * per_seq - 1, layout, table, torch.bfloat16)
    huge = torch.zeros(3, fp8_prefill.MAX_SCRATCH_BYTES // 16, dtype=torch.int32)
    assert not fp8_prefill.worth_it(10**9, layout, huge, torch.bfloat16)
