"""The benchmarks' correctness checks at a head configuration beyond the default: 14 query
heads over 2 KV heads (a group of 7, like Qwen2.5-7B's 28/4) or 6 over 2 (the model check),
on CPU under the Triton interpreter at tiny shapes. Each check must pass on the kernel's
output and fail on a corrupted one.

The prefill benchmark's reference check used fixed heads (0, 13, 31) and crashed with an
IndexError at 28 query / 4 KV heads; `check_heads` now picks them from the head counts.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention.triton.extend import default_config  # noqa: E402
from attention.triton.rope_store import rope_store  # noqa: E402
from attention.variants import Variant  # noqa: E402
from bench.attention import cli as bench_cli  # noqa: E402
from bench.attention import decode, decode_checks, prefill, prefill_checks  # noqa: E402
from bench.attention import rope_store as rope_store_bench  # noqa: E402
from bench.attention.common import build_paged_kv  # noqa: E402
from bench.attention.prefill_peers import check_heads, reference_rel_error  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402

HQ, HKV, D = 14, 2, 32  # a group of 7
CPU = torch.device("cpu")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("hq, hkv", [(28, 4), (32, 8), (14, 2), (9, 3), (6, 2), (8, 8), (1, 1)])
def test_check_heads_fit_any_group(hq: int, hkv: int) -> None:
    heads = check_heads(hq, hkv)
    assert heads == sorted(set(heads)) and all(0 <= h < hq for h in heads)
    group = hq // hkv
    assert heads[0] // group == 0 and heads[-1] // group == hkv - 1  # first and last KV group
    if hkv > 2:
        assert len({h // group for h in heads}) == 3


def test_check_heads_reject_heads_that_do_not_group() -> None:
    with pytest.raises(ValueError, match="do not split"):
        check_heads(28, 3)


def _peer_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """torch SDPA with GQA and a bottom-right causal mask: what a peer returns."""
    Lq, Lk = q.shape[2], k.shape[2]
    keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale, enable_gqa=True)


def test_reference_error_at_qwen_heads() -> None:
    """The peers' check at 28 query / 4 KV heads (it raised IndexError with heads 0, 13, 31)."""
    gen = _gen()
    q = torch.randn(2, 28, 5, 16, generator=gen)
    k, v = (torch.randn(2, 4, 12, 16, generator=gen) for _ in range(2))
    out = _peer_like(q, k, v, 0.25)
    heads = check_heads(28, 4)
    assert reference_rel_error(q, k, v, out, 0.25, heads) < 1e-5
    bad = out.clone()
    bad[1, heads[1], 3] += 1.0  # one row of one checked head
    assert reference_rel_error(q, k, v, bad, 0.25, heads) > 1e-2
    # a head one KV group off reads the wrong keys: the reference must notice
    swapped = out.clone()
    swapped[:, heads[1]] = out[:, heads[1] + 7 if heads[1] + 7 < 28 else heads[1] - 7]
    assert reference_rel_error(q, k, v, swapped, 0.25, heads) > 1e-2
    with pytest.raises(ValueError, match="not all among the 28"):
        reference_rel_error(q, k, v, out, 0.25, [0, 13, 31])


@pytest.mark.parametrize("layout_name, page_size", [("nhd", 16), ("token", 1)])
def test_prefill_benchmark_check_path(layout_name: str, page_size: int) -> None:
    """The timed cases' check: the kernel's output in every layout against the reference on
    `check_heads`, as `_triton_rows` runs it (NaN when an element is left unwritten)."""
    gen = _gen(1)
    case = prefill.Case("extend", 2, 9, 13)
    q4 = torch.randn(case.batch, case.new_tokens, HQ, D, generator=gen)
    k4, v4 = (torch.randn(case.batch, case.context, HKV, D, generator=gen) for _ in range(2))
    paged = build_paged_kv(k4, v4, [case.context] * case.batch, layout_name, page_size, gen)
    launch, out = prefill.paged_launcher(case, q4, paged, Variant("softmax"))
    cfg = default_config(D, CPU, layout_name)
    assert prefill.launch_error(launch, out, cfg, q4, k4, v4) < prefill.TOL

    def corrupted(cfg: object) -> None:
        launch(cfg)
        out.view(case.batch, case.new_tokens, HQ, D)[1, 4, check_heads(HQ, HKV)[1]] += 1.0

    assert prefill.launch_error(corrupted, out, cfg, q4, k4, v4) > prefill.TOL
    assert math.isnan(prefill.launch_error(lambda cfg: None, out, cfg, q4, k4, v4))


def test_prefill_ragged_check() -> None:
    """`check_variants`' ragged batch (empty and odd prefixes, a one-token run, NaN in every
    slot no sequence owns) at a group of 7."""
    torch.manual_seed(2)
    result = prefill_checks._check(CPU, "hnd", 8, HQ, HKV, D, Variant("softmax"), [0, 5, 19],
                                   [9, 1, 4], dtype=torch.float32)
    assert result["ok"], result
    assert result["heads"] == [HQ, HKV]


@pytest.mark.parametrize("op", ["prefill", "extend", "decode", "rope_store"])
def test_benchmarks_reject_heads_that_do_not_group(
    op: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any device work: a clear message, not an error deep in a check."""
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--op", op, "--num-q-heads", "28", "--num-kv-heads", "3"])
    assert exit_info.value.code not in (0, None)
    assert "not a multiple of --num-kv-heads 3" in f"{exit_info.value.code}{capsys.readouterr().err}"


# ----------------------------------------------------------------------------- decode


def test_decode_ragged_checks() -> None:
    """`--check`'s ragged, NaN-poisoned batch at a group of 7 in hnd_x, every split class."""
    results = decode_checks.ragged_checks(
        "hnd_x", 16, CPU, _gen(3), shapes=[(HQ, HKV, D, torch.float32)], lens=[1, 17, 40],
        variants=[Variant("softmax")],
    )
    assert [r["splits"] for r in results] == [1, 3, 16]
    assert all(r["ok"] and r["heads"] == [HQ, HKV] for r in results), results


def test_decode_benchmark_check_path() -> None:
    """The timed shapes' check: the Triton output against `reference_out` (float32 torch)."""
    gen = _gen(4)
    # float32: under the interpreter the decode kernel's bf16 output is wrong at any group
    # (8/2 as well); the benchmark runs bf16 on the GPU
    p = decode.make_problem(decode.Shape(3, 40), HQ, HKV, D, CPU, gen, torch.float32)
    paged = build_paged_kv(p.k, p.v, [40] * 3, "nhd", 16, gen)
    variant = Variant("softcap", 30.0)
    run = decode.triton_run(p, paged, variant, num_sms=4)
    run.out.fill_(float("nan"))
    run.fn()
    want = decode.reference_out(p, variant)
    assert decode.rel_err(run.out, want) < 1e-2
    run.out[2, 9] += 0.5
    assert decode.rel_err(run.out, want) > 1e-2


# ----------------------------------------------------------------------------- rope_store


@pytest.mark.parametrize("layout_name, page_size", [("nhd", 4), ("hnd_x", 8)])
def test_rope_store_check(layout_name: str, page_size: int) -> None:
    gen = _gen(5)
    layout = KVLayout.create(layout_name, page_size, HKV, D, "float32")
    num_pages = 8
    k_cache = torch.zeros(layout.cache_shape(num_pages))
    v_cache = torch.zeros_like(k_cache)
    cos_sin = rope_store_bench.rotary_table(D, 64, CPU)
    for case in (rope_store_bench.StoreCase("prompt_mid_run", 6),
                 rope_store_bench.StoreCase("decode", 3)):
        call_args = rope_store_bench.case_call_args(case, layout, num_pages, k_cache, v_cache,
                                                    cos_sin, HQ, gen)
        rope_store(*call_args)
        assert rope_store_bench._check(call_args) < 1e-4
        call_args[-1][0, HQ - 1] += 1.0  # q_out of the last head
        assert rope_store_bench._check(call_args) > 0.5


# ----------------------------------------------------------------------------- model check


def test_decode_model_check() -> None:
    """`bench.decode_model_check`: teacher-forced logits of a one-layer model with 14 query /
    2 KV heads through `triton` and the reference+triton hybrid vs `reference` (prefill, a
    step mixing decodes with a new prompt's prefill, a plain decode step)."""
    from bench import decode_model_check
    from model.config import ModelConfig
    from model.llama import attention_config
    from model.loader import empty_model
    from model.presets import init_synthetic_weights

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=HQ, num_kv_heads=HKV, head_dim=16, max_position_embeddings=256)
    model = empty_model(config, torch.float32, CPU)
    init_synthetic_weights(model, 0)
    rng = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 128, (n,), generator=rng).tolist() for n in (5, 19, 1)]
    forced = [torch.randint(0, 128, (2,), generator=rng).tolist() for _ in prompts]
    late = torch.randint(0, 128, (7,), generator=rng).tolist()
    errors = decode_model_check.trace_errors(model, attention_config(config), "nhd:8", prompts,
                                             forced, late)
    assert set(errors) == {"triton", "prefill=reference,decode=triton"}
    assert all(e < decode_model_check.TOL for e in errors.values()), errors
