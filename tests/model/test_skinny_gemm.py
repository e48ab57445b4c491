"""The skinny GEMM (model/skinny_gemm.py) under the CPU interpreter against a float64
product, and `--decode-gemm`'s layer dispatch (model/decode_gemm.py).

Shapes whose N and K are not multiples of the tiles, 1 to 64 rows, tl.dot and the
elementwise path, one and several K splits, with and without a bias, float32, bfloat16 and
float16; split-K sums come out bit-identical run after run."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import model.decode_gemm as decode_gemm  # noqa: E402
from model.decode_gemm import SkinnyLinear, check_decode_gemm, use_decode_gemm  # noqa: E402
from model.skinny_gemm import (  # noqa: E402
    FMA_MAX_ROWS,
    MAX_ROWS,
    TUNED,
    SkinnyConfig,
    choose_config,
    heuristic_config,
    launch_shape,
    row_block,
    skinny_linear,
)

# relative rounding of one output element by dtype: half an ulp, but a whole one for bf16,
# which the interpreter truncates from float32 (the GPU rounds to nearest)
ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-11}


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def _assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                  b: torch.Tensor | None) -> None:
    """Within the output's rounding plus float32 accumulation error of the |x| |w| sum."""
    ref = _reference(x, w, b)
    magnitude = x.double().abs() @ w.double().abs().T
    if b is not None:
        magnitude = magnitude + b.double().abs()
    bound = ROUNDING[y.dtype] * ref.abs() + 1e-6 * magnitude + 1e-30
    err = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"worst {(err / bound).max().item():.2f}x the bound"


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


# (m, n, k, config): N and K off the tiles; splits of unequal length; padded row blocks
CASES = [
    (1, 50, 100, SkinnyConfig(16, 32, 1, use_dot=False)),
    (1, 37, 200, SkinnyConfig(16, 32, 4, use_dot=False)),
    (3, 70, 130, SkinnyConfig(16, 32, 2, use_dot=False)),
    (3, 45, 96, SkinnyConfig(32, 32, 1, use_dot=True)),
    (16, 33, 150, SkinnyConfig(16, 32, 3, use_dot=True)),
    (16, 64, 64, SkinnyConfig(32, 16, 1, use_dot=True)),
    (33, 40, 100, SkinnyConfig(16, 32, 1, use_dot=True)),
    (33, 19, 260, SkinnyConfig(16, 64, 4, use_dot=True)),
    (64, 50, 70, SkinnyConfig(32, 32, 2, use_dot=True)),
    (64, 24, 48, SkinnyConfig(16, 16, 1, use_dot=True)),
]


@pytest.mark.parametrize("m,n,k,config", CASES, ids=lambda c: getattr(c, "label", lambda: c)())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_float64(m, n, k, config, dtype):
    for bias in (False, True):
        x, w, b = _inputs(m, n, k, dtype, bias, seed=m * 1000 + n + k)
        _assert_close(skinny_linear(x, w, b, config), x, w, b)


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64])
def test_default_config_in_float16_with_a_strided_x(m):
    """The heuristic's config; x a column slice of a wider tensor (rows not contiguous)."""
    x_wide, w, b = _inputs(m, 40, 150, torch.float16, True, seed=m)
    x = torch.cat([x_wide, x_wide[:, :20]], dim=1)[:, :150]
    assert x.stride(0) == 170  # the kernel walks rows by their stride
    _assert_close(skinny_linear(x, w, b), x, w, b)


def test_split_k_is_bit_identical_run_to_run():
    x, w, b = _inputs(5, 48, 300, torch.bfloat16, True, seed=7)
    config = SkinnyConfig(16, 32, 4, use_dot=True)
    assert launch_shape(300, config)[1] == 4
    first = skinny_linear(x, w, b, config)
    for _ in range(2):
        assert torch.equal(skinny_linear(x, w, b, config), first)


def test_bad_calls_are_refused():
    x, w, _ = _inputs(MAX_ROWS + 1, 16, 32, torch.float32, False, seed=0)
    with pytest.raises(ValueError, match="1..64 rows"):
        skinny_linear(x, w)
    with pytest.raises(ValueError, match="wants x"):
        skinny_linear(x[:4, :16], w)
    with pytest.raises(ValueError, match="but the weight is"):
        skinny_linear(x[:4], w.half())
    with pytest.raises(ValueError, match="tiles of at least 16"):
        skinny_linear(x[:4], w, config=SkinnyConfig(8, 64, use_dot=True))


LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
             "down": (4096, 14336), "lm_head": (128256, 4096)}


@pytest.mark.parametrize("num_sms", [132, 8])
def test_heuristic_configs_cover_k_and_fill_the_device(num_sms):
    for n, k in LLAMA3_8B.values():
        for m in range(1, MAX_ROWS + 1):
            c = heuristic_config(m, n, k, num_sms)
            assert c.use_dot == (m > FMA_MAX_ROWS)
            for size in (c.block_n, c.block_k, c.split_k):
                assert size & (size - 1) == 0
            per_split, splits = launch_shape(k, c)
            assert per_split % c.block_k == 0 and (splits - 1) * per_split < k <= splits * per_split
            assert per_split >= 4 * c.block_k  # each split streams several tiles
            programs = -(-n // c.block_n) * splits
            # few programs only when K is too short to split further
            per_sm = 1.5 if c.use_dot else 4.0
            assert programs >= per_sm * num_sms or per_split < 8 * c.block_k
            if not c.use_dot:  # the elementwise accumulator's registers
                assert row_block(m, False) * c.block_n * c.block_k <= 64 * 32 * c.num_warps


def test_tuned_configs_take_precedence(monkeypatch):
    tuned = SkinnyConfig(64, 128, 2, use_dot=True, num_warps=8, num_stages=5)
    monkeypatch.setitem(TUNED, (32, 4096, 4096), tuned)
    assert choose_config(20, 4096, 4096, 132) == tuned
    assert choose_config(16, 4096, 4096, 132) == heuristic_config(16, 4096, 4096, 132)


# ----------------------------------------------------------------------------- dispatch


class _Row(nn.Linear):
    """Stands for RowParallelLinear: a subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) * 2


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 24, bias=False), _Row(24, 8))
    model.logits_linear = F.linear
    return model


def test_use_decode_gemm_switches_plain_linears_and_back(monkeypatch):
    model = _tiny()
    seen: list[int] = []

    def recording(x, weight, bias=None, config=None):
        seen.append(x.shape[0])
        return skinny_linear(x, weight, bias, config)

    monkeypatch.setattr(decode_gemm, "skinny_linear", recording)
    x_small, x_big = torch.randn(3, 24), torch.randn(MAX_ROWS + 1, 24)
    expected = [model(x_small), model(x_big)]
    assert use_decode_gemm(model, "triton") == 2
    assert [type(m) for m in model] == [SkinnyLinear, SkinnyLinear, _Row]
    assert model.logits_linear is decode_gemm.skinny_or_torch
    out_small, out_big = model(x_small), model(x_big)
    assert seen == [3, 3]  # the two plain layers of the small call; the large one is torch's
    assert torch.allclose(out_small, expected[0], atol=1e-5)
    assert torch.equal(out_big, expected[1])
    model.logits_linear(x_small, model[0].weight)
    assert seen[-1] == 3
    assert use_decode_gemm(model, "torch") == 2
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, _Row]
    assert model.logits_linear is F.linear
    model(x_small)
    assert len(seen) == 3


def test_decode_gemm_is_refused_where_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="one of torch, triton"):
        check_decode_gemm("cublas", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="does not take"):
        check_decode_gemm("triton", torch.device("cuda"), torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_decode_gemm("triton", torch.device("cpu"), torch.float32)
    check_decode_gemm("torch", torch.device("cpu"), torch.float32)


def test_the_cli_offers_the_models_choices():
    from server.engine.config import DECODE_GEMMS

    assert DECODE_GEMMS == decode_gemm.DECODE_GEMMS

