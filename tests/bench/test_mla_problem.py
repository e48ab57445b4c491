"""The MLA benchmark's problems (CPU, Triton interpreter): the latent form the kernel reads
and the expanded K/V the SDPA peer reads describe the same attention, so the benchmark's
in-run check compares like with like."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention.mla.kernels import MLAKernelConfig  # noqa: E402
from bench.attention.mla import triton_fn  # noqa: E402
from bench.attention.mla_problem import MLAShape, make_mla_problem, paged_rows  # noqa: E402


@pytest.mark.parametrize(("text", "decode"), [("2x37", True), ("1x20x7", False), ("2x9", False)])
def test_latent_kernel_equals_sdpa_on_expanded_kv(text, decode):
    shape = MLAShape.parse(text, decode)
    gen = torch.Generator().manual_seed(0)
    p = make_mla_problem(shape, 4, 32, 16, 16, 24, torch.device("cpu"), gen, torch.float32)
    cache, table = paged_rows(p.rows, 16, gen)
    fn, out = triton_fn(p, cache, table, 2 if decode else 1,
                        MLAKernelConfig(16, 16, 4, 1))
    fn()
    q, k, v = p.expand()
    N, L = shape.new_tokens, shape.context
    mask = torch.ones(N, L, dtype=torch.bool).tril(L - N)  # bottom-right causal
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)
    got = p.project_out(out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert p.latent_bytes() < p.expanded_bytes()
    assert shape.visible_keys() == sum(L - N + j + 1 for j in range(N))
