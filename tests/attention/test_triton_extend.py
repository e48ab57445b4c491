"""The Triton extend kernel under the CPU interpreter vs an independent float64 reference.

Every layout x variant x GQA group size, on ragged batches that mix empty and non-empty
prefixes (not multiples of the page size), shuffled page ids, NaN-poisoned cache slots
that no sequence owns and a NaN-poisoned output.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.triton.extend import extend_attention, extend_attention_with_config  # noqa: E402
from attention.triton.extend_config import ExtendConfig  # noqa: E402
from attention.variants import Variant, alibi_slopes  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402
from tests.attention.attention_oracle import place_token  # noqa: E402

LAYOUTS = ("token", "nhd", "hnd", "hnd_x")
VARIANTS = (
    Variant("softmax"),
    Variant("softcap", 1.5),
    Variant("sliding_window", 6.0),
    Variant("alibi"),
    Variant("sigmoid"),
    Variant("silu"),
)
NUM_KV_HEADS = 2
HEAD_DIM = 32



def _make_batch(layout: KVLayout, prefix_lens: list[int], q_lens: list[int], dtype, gen):
    """Dense per-sequence K/V, scattered into a NaN-poisoned paged cache at shuffled pages."""
    P = layout.page_size
    pages_per_seq = [math.ceil((p + n) / P) for p, n in zip(prefix_lens, q_lens, strict=True)]
    num_pages = sum(pages_per_seq) + 3  # + scratch page 0 + two pages nobody owns
    shape = layout.cache_shape(num_pages)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables, ks, vs = [], [], []
    for p, n, npages in zip(prefix_lens, q_lens, pages_per_seq, strict=True):
        pages = [ids.pop() for _ in range(npages)]
        k = torch.randn(p + n, layout.num_kv_heads, layout.head_dim, generator=gen, dtype=dtype)
        v = torch.randn(p + n, layout.num_kv_heads, layout.head_dim, generator=gen, dtype=dtype)
        for pos in range(p + n):
            place_token(k_cache, layout, pages[pos // P], pos % P, k[pos])
            place_token(v_cache, layout, pages[pos // P], pos % P, v[pos])
        tables.append(pages)
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables) + 2  # padding entries point at the scratch page 0
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return k_cache, v_cache, block_table, ks, vs


def _user_logits_torch(s, q_pos, k_pos):
    return 0.5 * s - 0.125 * (q_pos - k_pos).to(s.dtype)


def _reference(q, ks, vs, prefix_lens, q_lens, scale, variant, slopes):
    """float64, per sequence, written from the variant definitions (not the engine's oracle)."""
    outs = []
    Hq = q.shape[1]
    start = 0
    for k, v, p, n in zip(ks, vs, prefix_lens, q_lens, strict=True):
        qb = q[start : start + n].double()
        start += n
        group = Hq // k.shape[1]
        kb = k.double().repeat_interleave(group, dim=1)
        vb = v.double().repeat_interleave(group, dim=1)
        s = torch.einsum("lhd,shd->hls", qb, kb) * scale
        q_pos = (p + torch.arange(n)).view(1, n, 1)
        k_pos = torch.arange(p + n).view(1, 1, p + n)
        visible = k_pos <= q_pos
        name = variant.name
        if name == "softcap":
            s = variant.param * torch.tanh(s / variant.param)
        elif name == "alibi":
            s = s + slopes.double().view(Hq, 1, 1) * (k_pos - q_pos)
        elif name == "sliding_window":
            visible = visible & (q_pos - k_pos < variant.param)
        elif ":" in name:
            s = _user_logits_torch(s, q_pos, k_pos)
        if name == "sigmoid":
            w = torch.sigmoid(s) * visible
        elif name == "silu":
            w = s * torch.sigmoid(s) * visible / visible.sum(-1, keepdim=True)
        else:
            w = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append(torch.einsum("hls,shd->lhd", w, vb))
    return torch.cat(outs)


def _run_case(layout_name, page_size, variant, group, prefix_lens, q_lens, dtype=torch.float32,
              head_dim=HEAD_DIM, pass_slopes=True, config=None):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, head_dim, str(dtype))
    k_cache, v_cache, block_table, ks, vs = _make_batch(layout, prefix_lens, q_lens, dtype, gen)
    Hq = NUM_KV_HEADS * group
    T = sum(q_lens)
    q = torch.randn(T, Hq, head_dim, generator=gen, dtype=dtype)
    slopes = torch.rand(Hq, generator=gen) * 0.5 if pass_slopes else alibi_slopes(Hq).float()
    indptr = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    args = (
        q, k_cache, v_cache, layout, indptr,
        torch.tensor(prefix_lens, dtype=torch.int32),
        torch.tensor([p + n for p, n in zip(prefix_lens, q_lens, strict=True)], dtype=torch.int32),
        block_table, out, scale, variant, max(q_lens),
        slopes if pass_slopes else None,
    )
    if config is None:
        extend_attention(*args)
    else:
        extend_attention_with_config(*args, config)
    ref = _reference(q, ks, vs, prefix_lens, q_lens, scale, variant, slopes)
    assert torch.isfinite(out).all(), "unwritten (NaN) output rows or NaN cache slots read"
    err = (out.double() - ref).norm() / ref.norm()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < tol, f"relative error {err:.2e}"


def _ragged(page_size: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Three sequences: an empty prefix, a prefix that is not a page multiple, a decode-like
    one-token run; lengths drawn afresh."""
    def draw(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    odd_prefix = draw(1, 40)
    if page_size > 1 and odd_prefix % page_size == 0:
        odd_prefix += 1
    return [0, odd_prefix, draw(0, 45)], [draw(17, 40), draw(1, 30), 1]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_extend_matches_reference(layout_name, variant, group):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    # Page sizes 8 (tiles span pages) and 16/32 (one page per 16-key tile) across the matrix.
    page_size = 1 if layout_name == "token" else (8, 16, 32)[(VARIANTS.index(variant) + group) % 3]
    prefix_lens, q_lens = _ragged(page_size, gen)
    _run_case(layout_name, page_size, variant, group, prefix_lens, q_lens)


@pytest.mark.parametrize("layout_name", ["nhd", "hnd_x"])
def test_head_dim_64_and_padded_head_dim(layout_name):
    _run_case(layout_name, 16, Variant("softmax"), 2, [13, 0], [20, 33], head_dim=64)
    _run_case(layout_name, 8, Variant("softmax"), 2, [5, 30], [18, 3], head_dim=40)


@pytest.mark.parametrize("layout_name", ["nhd", "hnd"])
def test_bulk_copy_tiles_and_per_row_pages(layout_name):
    # The TMA path (tiles read through tensor descriptors) and the per-key page lookup.
    for config in (ExtendConfig(16, 16, 4, 1, tma=True, tma_diag=True),
                   ExtendConfig(16, 16, 4, 1, per_row_pages=True)):
        _run_case(layout_name, 32, Variant("softcap", 1.5), 3, [45, 0], [20, 37], config=config)


def test_default_alibi_slopes_and_long_prefix():
    # No slopes passed: the kernel must use the standard ALiBi slopes for Hq heads; the
    # prefix spans many tiles so the unmasked loop runs several times.
    _run_case("hnd", 16, Variant("alibi"), 4, [71, 0], [9, 24], pass_slopes=False)


def test_sequence_with_no_new_tokens_is_skipped():
    _run_case("nhd", 8, Variant("softmax"), 3, [11, 20, 0], [5, 0, 19])


def test_user_registered_variant(tmp_path, monkeypatch):
    module = "user_variant_for_extend_test"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def shrink_and_decay(s, q_pos, k_pos, slope, param):
            return 0.5 * s - 0.125 * (q_pos - k_pos).to(tl.float32)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        _run_case("hnd_x", 16, Variant(f"{module}:shrink_and_decay"), 3, [0, 23], [26, 9])
    finally:
        sys.modules.pop(module, None)


def test_engine_triton_backend_matches_reference_greedy():
    """Issue 7 b: SmolLM2 through the engine with the triton backend (extend + decode kernels
    under the interpreter), chunked prefill and the prefix cache on, gives the reference
    backend's greedy tokens. Tiny on purpose: the interpreter is slow."""
    from scheduler.request import SamplingParams
    from tests.server.engine_fixtures import make_llm, smollm2

    tok = smollm2().tokenizer
    shared = tok.encode("The history of computing is a story of abstraction layered on")
    prompts = [shared + tok.encode(" abstraction."), shared + tok.encode(" machines and"),
               tok.encode("Once upon a time,")]
    params = SamplingParams(max_tokens=3, temperature=0.0)
    outputs = {}
    for backend in ("reference", "triton"):
        llm = make_llm(attention_backend=backend, kv_layout="nhd", page_size=4,
                       max_num_batched_tokens=12)
        outputs[backend] = [r.token_ids for r in llm.generate(prompts, params)]
    assert all(len(t) == 3 for t in outputs["reference"])
    assert outputs["triton"] == outputs["reference"]


@pytest.mark.parametrize(("layout_name", "page_size"), [("token", 1), ("nhd", 16), ("hnd_x", 8)])
def test_warmup_launches_the_table_config(
    layout_name: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warmup_extend launches the kernel once, with the table's config and a float32 slopes
    pointer as serving passes (another pointer type would be another instance)."""
    import attention.triton.extend as extend_module

    real = extend_module._extend_kernel
    slopes_dtypes: list[torch.dtype] = []

    block_ms: list[object] = []

    class SpyKernel:
        def __getitem__(self, grid: object):
            def launch(*args: object, **kwargs: object) -> object:
                slopes_dtypes.append(args[10].dtype)  # slopes_ptr
                block_ms.append(kwargs["BLOCK_M"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(extend_module, "_extend_kernel", SpyKernel())
    layout = KVLayout.create(layout_name, page_size, 2, 16, "float32")
    extend_module.warmup_extend(layout, 6, Variant("softcap", 3.0), torch.device("cpu"),
                                torch.float32)
    assert slopes_dtypes == [torch.float32]
    assert block_ms == [extend_module.default_config(16, torch.device("cpu"), layout_name).block_m]


def test_hopper_table_sends_paged_runs_to_the_gluon_kernel() -> None:
    """The launch table marks Hopper head-dim-128 runs on nhd/hnd (the measured win of
    extend_sm90.py) and nothing else; the fallback fields stay a valid Triton config."""
    from attention.triton.extend_config import extend_config

    for name in ("nhd", "hnd"):
        picked = extend_config(128, 9, name)
        assert picked.hopper and picked.block_m > 0 and picked.num_stages > 0
    for name in ("token", "hnd_x"):
        assert not extend_config(128, 9, name).hopper
    assert not extend_config(128, 8, "nhd").hopper  # Ampere: no Gluon wgmma
    assert not extend_config(64, 9, "nhd").hopper  # not measured for head dim 64


def test_hopper_flag_on_cpu_runs_the_portable_kernel() -> None:
    """A config with `hopper` set still serves calls the Gluon kernel cannot (here: CPU
    tensors under the interpreter) through the Triton kernel, with the same result."""
    _run_case("nhd", 16, Variant("softmax"), 2, [13, 0], [20, 33],
              config=ExtendConfig(16, 16, 4, 1, hopper=True))


def test_a_gluon_kernel_that_cannot_launch_falls_back_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the Gluon kernel raises while building or launching (another Triton build, a
    driver without what it needs), the call and every later one run the Triton kernel:
    right results, one warning, no further attempts."""
    import attention.triton.extend as extend_module

    class Unlaunchable:
        calls = 0

        @staticmethod
        def supports(*args: object, **kwargs: object) -> bool:
            return True

        @classmethod
        def extend_attention_sm90(cls, *args: object, **kwargs: object) -> None:
            cls.calls += 1
            raise RuntimeError("no sm_90a here")

    monkeypatch.setattr(extend_module, "extend_sm90", Unlaunchable)
    monkeypatch.setattr(extend_module, "_sm90_unavailable", None)
    config = ExtendConfig(16, 16, 4, 1, hopper=True)
    with caplog.at_level("WARNING", logger="attention.triton.extend"):
        _run_case("hnd", 16, Variant("softmax"), 2, [13, 0], [20, 33], config=config)
        _run_case("nhd", 16, Variant("softmax"), 1, [5], [9], config=config)
    assert Unlaunchable.calls == 1
    assert "no sm_90a here" in (extend_module._sm90_unavailable or "")
    assert sum("Gluon sm90 extend kernel failed" in r.message for r in caplog.records) == 1


def test_benchmarks_name_the_kernel_that_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill benchmark labels each row with the kernel a call actually takes."""
    import attention.triton.extend as extend_module

    layout = KVLayout.create("nhd", 64, 2, 16, "float32")
    q = torch.zeros(3, 4, 16)
    config = ExtendConfig(16, 16, 4, 1, hopper=True)
    assert extend_module.kernel_name(config, q, layout, Variant("softmax")) == f"triton {config}"
    if extend_module.extend_sm90 is not None:
        monkeypatch.setattr(extend_module.extend_sm90, "supports", lambda *a, **k: True)
        monkeypatch.setattr(extend_module, "_sm90_unavailable", None)
        name = extend_module.kernel_name(config, q, layout, Variant("softmax"))
        assert name.startswith("gluon-sm90 ")
        plain = ExtendConfig(16, 16, 4, 1)
        assert extend_module.kernel_name(plain, q, layout, Variant("softmax")).startswith("triton")
