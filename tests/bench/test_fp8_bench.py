"""The kernel benchmarks on FP8 pages, on CPU under the Triton interpreter at tiny shapes:
the pages are quantized as the store kernel does, the kernels' output checks against the
reference on the dequantized K/V (and fails on a corrupted output), and the bytes counted
for the bandwidth fraction are the codes and scales actually read."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402

from attention.triton.extend import default_config  # noqa: E402
from attention.variants import Variant  # noqa: E402
from bench.attention import decode, prefill  # noqa: E402
from bench.attention.common import build_paged_kv, dequantized  # noqa: E402
from kvcache.kv_dtype import PER_TOKEN_HEAD, KVCacheDtype  # noqa: E402

HQ, HKV, D = 6, 2, 32
CPU = torch.device("cpu")
FP8 = KVCacheDtype(torch.float8_e4m3fn, PER_TOKEN_HEAD)


def test_decode_benchmark_on_fp8_pages() -> None:
    gen = torch.Generator().manual_seed(5)
    p = decode.make_problem(decode.Shape(3, 40), HQ, HKV, D, CPU, gen, torch.float32)
    paged = build_paged_kv(p.k, p.v, [40] * 3, "hnd_x", 16, gen, kv_dtype=FP8)
    assert paged.kv_dtype_name == "fp8_e4m3" and paged.layout.x == 16
    # bytes read: one byte a code and a float32 scale per (token, head), K and V; q and out
    assert p.paged_nbytes(paged) == 3 * 40 * 2 * HKV * (D + 4) + 2 * 3 * HQ * D * 4
    variant = Variant("softcap", 30.0)
    run = decode.triton_run(p, paged, variant, num_sms=4)
    run.out.fill_(float("nan"))
    run.fn()
    want = decode.reference_out(decode._dequantized_problem(p, FP8), variant)
    assert decode.rel_err(run.out, want) < 1e-5
    # against the unquantized K/V the difference is the quantization's, not the kernel's
    assert 1e-3 < decode.rel_err(run.out, decode.reference_out(p, variant)) < 0.1
    run.out[2, 3] += 0.5
    assert decode.rel_err(run.out, want) > 1e-2


def test_prefill_benchmark_check_path_on_fp8_pages() -> None:
    gen = torch.Generator().manual_seed(6)
    case = prefill.Case("extend", 2, 9, 13)
    q4 = torch.randn(case.batch, case.new_tokens, HQ, D, generator=gen)
    k4, v4 = (torch.randn(case.batch, case.context, HKV, D, generator=gen) for _ in range(2))
    paged = build_paged_kv(k4, v4, [case.context] * case.batch, "nhd", 16, gen, kv_dtype=FP8)
    launch, out = prefill.paged_launcher(case, q4, paged, Variant("softmax"))
    cfg = default_config(D, CPU, "nhd")
    k_ref, v_ref = dequantized(k4, FP8), dequantized(v4, FP8)
    assert prefill.launch_error(launch, out, cfg, q4, k_ref, v_ref) < 1e-5
    assert prefill.launch_error(launch, out, cfg, q4, k4, v4) > 1e-4  # quantization shows
    bf16_bytes = case.nbytes(HQ, HKV, D)
    fp8_bytes = case.nbytes(HQ, HKV, D, paged.kv_bytes_per_token())
    kv_bf16 = case.batch * case.context * 2 * HKV * D * 2
    assert bf16_bytes - fp8_bytes == kv_bf16 - case.batch * case.context * 2 * HKV * (D + 4)
