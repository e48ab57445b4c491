"""The FP8 ceiling study's simulator (bench/kv_rounding.py) and its driver (bench/fp8_ceiling.py):
the roundings against torch's own casts, smoothing's exact invariances in float64, the pool
hook, and a short run whose e4m3/row simulation equals the real FP8 cache."""

from __future__ import annotations

import json

import pytest
import torch

from bench import fp8_ceiling
from bench.fp8_accuracy import stdlib_docstrings, teacher_forced
from bench.kv_rounding import (
    ElementRounding,
    RowRounding,
    SideRounding,
    hadamard,
    install,
    round_e4m3_blocks,
    round_int8_rows,
    round_mantissa,
)
from kvcache.kv_dtype import PER_TENSOR, PER_TOKEN_HEAD, KVCacheDtype, dequantize_rows, quantize_rows
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig
from tests.server.engine_fixtures import smollm2


def _rows_with_exponents(lo: int, hi: int, n: int, seed: int) -> torch.Tensor:
    """Random float32 values of both signs with exponents in [lo, hi), plus exact ties of
    every target grid (mantissas ending in a half step)."""
    g = torch.Generator().manual_seed(seed)
    mant = 1 + torch.rand(n, generator=g)
    exp = torch.randint(lo, hi, (n,), generator=g).float()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    ties = (1 + (torch.arange(n) % 16 + 0.5) / 16) * 2.0 ** exp  # halfway between 3-bit steps
    return torch.cat([sign * mant * 2.0 ** exp, ties]).float()


def test_three_mantissa_bits_are_e4m3_where_its_exponent_reaches() -> None:
    x = _rows_with_exponents(-6, 8, 4096, 0)  # e4m3's normal range: 2^-6 .. 448
    x = x[x.abs() <= 448]
    assert torch.equal(round_mantissa(x, 3), x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize(("bits", "dtype", "lo", "hi"), [(7, torch.bfloat16, -120, 120),
                                                        (10, torch.float16, -14, 15)])
def test_mantissa_rounding_matches_torch_casts(bits: int, dtype: torch.dtype, lo: int,
                                               hi: int) -> None:
    x = _rows_with_exponents(lo, hi, 4096, bits)
    assert torch.equal(round_mantissa(x, bits), x.to(dtype).float())


def test_mantissa_rounding_has_no_exponent_limit() -> None:
    x = torch.tensor([2.0**-40 * 1.0625, 2.0**40 * 1.1875, 2.0**-40 * 1.09375])
    # 1.0625 = 1 + 1/16 is a tie: to even (1.0); 1.1875 = 1 + 3/16: to 1.25; 1.09375: 1.125
    expected = torch.tensor([2.0**-40, 2.0**40 * 1.25, 2.0**-40 * 1.125])
    assert torch.equal(round_mantissa(x, 3), expected)
    assert x.to(torch.float8_e4m3fn).float()[0] == 0  # where e4m3 itself has nothing


def test_e4m3_rounding_is_the_production_quantization() -> None:
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.arange(
        -3, 2).view(5, 1, 1)
    assert torch.equal(round_e4m3_blocks(x, 64), dequantize_rows(*quantize_rows(x, PER_TOKEN_HEAD)))
    assert torch.equal(round_e4m3_blocks(x, None), dequantize_rows(*quantize_rows(x, PER_TENSOR)))
    # a block of 16 is four independent rows of 16
    blocks = round_e4m3_blocks(x, 16)
    assert torch.equal(blocks, round_e4m3_blocks(x.reshape(5, 3, 4, 16), 16).reshape(x.shape))
    # block scales matter only past e4m3's range within a row: 1e-3 next to 1e4 is lost to
    # a row's scale (below the smallest subnormal), kept by its own block's
    wide = torch.cat([torch.full((16,), 1e4), torch.full((48,), 1e-3)])
    assert round_e4m3_blocks(wide, 64)[16:].eq(0).all()
    assert torch.allclose(round_e4m3_blocks(wide, 16), wide, rtol=1 / 16)


def test_hadamard_is_orthonormal() -> None:
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ValueError):
        hadamard(48)


def _paged_rows(seed: int, pages: int = 3, page: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a strong per-channel offset (what smoothing removes) plus noise, [tokens, heads=2, D=8]
    rows = torch.randn(1, 2, 8, generator=g) * 20 + torch.randn(pages * page, 2, 8, generator=g)
    return rows.float(), torch.arange(pages * page) + page  # page 0 is the scratch page


def test_smoothing_changes_scores_only_by_q_dot_mu_per_page() -> None:
    """What a kernel computes (the rounded, centred rows, plus q.mu_page per page for K and
    sum-of-p-over-the-page times mu_page for V) equals attending to the stored rows, and a
    shared mu leaves the softmax exactly as it was (float64)."""
    k, slots = _paged_rows(2)
    v, _ = _paged_rows(3)
    page_size = 4
    side = SideRounding(ElementRounding("e4m3-row"), "page")
    stored = side(0, k, page_size)
    mu32 = torch.stack([side.group_mu(0, t // page_size) for t in range(len(slots))])
    codes32 = round_e4m3_blocks(k - mu32, 8)  # what the pages would hold, dequantized
    assert torch.equal(stored, codes32 + mu32)
    k_codes, mu = codes32.double(), mu32.double()
    k_stored = k_codes + mu
    q = torch.randn(2, 8, dtype=torch.float64)
    stored_scores = torch.einsum("hd,thd->ht", q, k_stored)
    kernel_scores = torch.einsum("hd,thd->ht", q, k_codes) + torch.einsum("hd,thd->ht", q, mu)
    assert torch.allclose(stored_scores, kernel_scores, rtol=0, atol=1e-12)
    # one mu for every key: the softmax ignores q.mu
    shared = mu[0].expand_as(k_codes)
    p_with = torch.softmax(torch.einsum("hd,thd->ht", q, k_codes + shared), dim=-1)
    p_without = torch.softmax(torch.einsum("hd,thd->ht", q, k_codes), dim=-1)
    assert torch.allclose(p_with, p_without, rtol=0, atol=1e-14)
    # V: P (codes + mu_page) = P codes + (sum of P over the page) mu_page
    v_side = SideRounding(ElementRounding("e4m3-row"), "page")
    v_stored32 = v_side(0, v, page_size)
    v_mu32 = torch.stack([v_side.group_mu(0, t // page_size) for t in range(len(slots))])
    v_codes32 = round_e4m3_blocks(v - v_mu32, 8)
    assert torch.equal(v_stored32, v_codes32 + v_mu32)
    v_codes, v_mu = v_codes32.double(), v_mu32.double()
    v_stored = v_codes + v_mu
    out_stored = torch.einsum("ht,thd->hd", p_without, v_stored)
    page_p = p_without.view(2, -1, page_size).sum(-1)  # [heads, pages]
    out_kernel = (torch.einsum("ht,thd->hd", p_without, v_codes)
                  + torch.einsum("hp,phd->hd", page_p, v_mu[::page_size]))
    assert torch.allclose(out_stored, out_kernel, rtol=0, atol=1e-12)


def test_smoothing_helps_rows_with_a_channel_offset() -> None:
    k, _ = _paged_rows(4)
    plain = SideRounding(ElementRounding("e4m3-row"))(0, k, 4)
    smooth = SideRounding(ElementRounding("e4m3-row"), "page")(0, k, 4)
    assert (smooth - k).norm() < 0.5 * (plain - k).norm()


def test_a_page_keeps_the_mu_of_its_first_write() -> None:
    k, _ = _paged_rows(5)
    side = SideRounding(ElementRounding(), "page")  # no rounding: rows come back as they were
    first = side(0, k[:6], 4)  # positions 0-3 (a page), 4-5 (half the next)
    second = side(0, k[6:], 4)
    assert torch.allclose(torch.cat([first, second]), k, atol=1e-5)
    assert torch.allclose(side.group_mu(0, 1), k[4:6].mean(0))  # not k[4:8]'s
    with pytest.raises(KeyError):
        side.group_mu(0, 3)


def test_mu_variants_first_row_group_size_and_rounded_mu() -> None:
    k, _ = _paged_rows(11)
    first_row = SideRounding(ElementRounding(), "page-first-row")
    first_row(0, k, 4)
    assert torch.equal(first_row.group_mu(0, 2), k[8])
    wide = SideRounding(ElementRounding(), "page", mu_tokens=8)
    wide(0, k, 4)
    assert torch.allclose(wide.group_mu(0, 1), k[8:].mean(0))
    e4m3_mu = SideRounding(ElementRounding("mantissa", bits=3), "page",
                           mu_element=ElementRounding("e4m3-row"))
    out = e4m3_mu(0, k, 4)
    mu = e4m3_mu.group_mu(0, 0)
    assert torch.equal(mu, round_e4m3_blocks(k[:4].mean(0), 8))  # stored as e4m3 rows too
    assert torch.equal(out[:4], round_mantissa(k[:4] - mu, 3) + mu)


def test_rotation_without_rounding_gives_the_rows_back() -> None:
    k, _ = _paged_rows(6)
    rotated = SideRounding(ElementRounding(), rotate=True)(0, k, 4)
    assert torch.allclose(rotated, k, atol=1e-4)
    rounded = SideRounding(ElementRounding("e4m3-row"), rotate=True)(0, k, 4)
    assert not torch.equal(rounded, k)
    signed = SideRounding(ElementRounding(), rotate=True, sign_seed=0)
    r = signed.rotation(8)
    assert torch.allclose(r @ r.T, torch.eye(8, dtype=torch.float64), atol=1e-14)
    assert not torch.equal(r, hadamard(8)) and torch.allclose(signed(0, k, 4), k, atol=1e-4)


def test_install_stores_what_the_rounding_reads_back() -> None:
    layout = KVLayout.create("nhd", 4, 2, 8, "float32")
    pool = KVPool(KVPoolConfig(layout, 1, 5, torch.float32, torch.device("cpu")))
    k, slots = _paged_rows(7)
    v, _ = _paged_rows(8)
    install(pool, RowRounding(SideRounding(ElementRounding("mantissa", bits=3)), SideRounding()))
    pool.store(0, k, v, slots)
    k_read, v_read = pool.gather(0, slots, torch.float32)
    assert torch.equal(k_read, round_mantissa(k, 3)) and torch.equal(v_read, v)
    fp8 = KVCacheDtype(torch.float8_e4m3fn, PER_TOKEN_HEAD)
    fp8_pool = KVPool(KVPoolConfig(KVLayout.create("nhd", 4, 2, 8, fp8.storage_name), 1, 5,
                                   torch.float32, torch.device("cpu"), fp8))
    with pytest.raises(ValueError):
        install(fp8_pool, RowRounding())


def test_simulated_e4m3_rows_are_the_fp8_cache_and_the_driver_runs(tmp_path) -> None:
    tokens = smollm2().tokenizer.encode(stdlib_docstrings())[:48]
    real = teacher_forced(tokens, "fp8", "per-token-head", attention_backend="reference")
    simulated = teacher_forced(tokens, "auto", "per-token-head", attention_backend="reference",
                               prepare=lambda llm: install(llm.engine.pool, RowRounding(
                                   SideRounding(ElementRounding("e4m3-row")),
                                   SideRounding(ElementRounding("e4m3-row")))))
    assert simulated.logprobs == real.logprobs and simulated.top1 == real.top1
    out = tmp_path / "ceiling.json"
    configs = "e4m3/row KV-mu/static"
    assert fp8_ceiling.main(["--tokens", "48", "--calibration-tokens", "32", "--configs", configs,
                             "--k-stats-tokens", "16", "--json-out", str(out)]) == 0
    written = json.loads(out.read_text())
    offsets = written["k_offsets"]["layers"]
    assert len(offsets) == 30 and all(0 < s <= 1 for o in offsets for s in o["largest_channel_share"])
    results = written["results"]
    assert list(results) == ["full", "e4m3/row KV-mu/static"]
    assert results["full"]["top1_agreement"] == 1 and results["full"]["perplexity_ratio"] == 1
    assert results["e4m3/row KV-mu/static"]["mean_abs_logprob_diff"] > 0


def test_int8_rows_sit_on_their_grid_within_half_a_step() -> None:
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(9)) * 3
    y = round_int8_rows(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(y / step, torch.round(y / step), atol=1e-4)
    assert ((y - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1))


def test_keep_first_leaves_the_first_tokens_unrounded() -> None:
    k, _ = _paged_rows(10)
    side = SideRounding(ElementRounding("mantissa", bits=3), keep_first=5)
    out = torch.cat([side(0, k[:3], 4), side(0, k[3:], 4)])
    assert torch.equal(out[:5], k[:5]) and torch.equal(out[5:], round_mantissa(k[5:], 3))
