"""The Triton decode kernel under the CPU interpreter vs an independent float64 reference.

Every layout x page size x GQA group size (1, 3, 4) x variant, with one and several KV
splits, shuffled page ids, sequence lengths that are not multiples of the page size,
NaN in every cache slot no sequence owns (the scratch page included) and a NaN-poisoned
output. Also the `triton` backend end to end on a mixed decode + prefill step.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.backends.reference import ReferenceBackend  # noqa: E402
from attention.backends.triton_backend import TritonBackend  # noqa: E402
from attention.base import AttentionConfig, RopeInputs  # noqa: E402
from attention.batch import ForwardBatch  # noqa: E402
from attention.triton.decode import (  # noqa: E402
    DecodeConfig,
    SplitBuffers,
    choose_num_splits,
    decode_attention,
    warmup_decode,
)
from attention.triton.variants import triton_variant  # noqa: E402
from attention.variants import Variant  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402
from kvcache.pool import KVPool, KVPoolConfig  # noqa: E402
from tests.attention.attention_oracle import place_token  # noqa: E402

HEAD_DIM = 16
NUM_KV_HEADS = 2
SEQ_LENS = [37, 5, 22]  # none a multiple of 4, 8 or 16
LAYOUT_PAGES = [("token", 1), ("nhd", 4), ("nhd", 16), ("hnd", 4), ("hnd", 16),
                ("hnd_x", 8), ("hnd_x", 16)]
DEFAULT = DecodeConfig(16, 4, 1)  # small tiles: several per split under the interpreter
VARIANTS = [Variant("softmax"), Variant("softcap", 2.0), Variant("sliding_window", 7.0),
            Variant("alibi"), Variant("sigmoid"), Variant("silu")]


def _slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes written out from the paper's recipe (geometric, interpolated)."""
    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    if num_heads & (num_heads - 1) == 0:
        vals = geometric(num_heads)
    else:
        base = 2 ** math.floor(math.log2(num_heads))
        vals = geometric(base) + geometric(2 * base)[::2][: num_heads - base]
    return torch.tensor(vals, dtype=torch.float64)



def _paged(k: list[torch.Tensor], v: list[torch.Tensor], layout: KVLayout, gen: torch.Generator,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    P = layout.page_size
    need = [-(-t.shape[0] // P) for t in k]
    num_pages = sum(need) + 4  # + scratch page 0 + unowned pages
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(k), max(need) + 2, dtype=torch.int32)  # spare columns stay 0
    shape = layout.cache_shape(num_pages)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    for b, (kb, vb) in enumerate(zip(k, v, strict=True)):
        pages = [ids.pop() for _ in range(need[b])]
        table[b, : need[b]] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(kb.shape[0]):
            place_token(k_cache, layout, pages[pos // P], pos % P, kb[pos].to(dtype))
            place_token(v_cache, layout, pages[pos // P], pos % P, vb[pos].to(dtype))
    return k_cache, v_cache, table


def _reference(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], scale: float,
               variant: Variant) -> torch.Tensor:
    """float64 decode attention: q [B, Hq, D] at position len-1, contiguous k/v per sequence."""
    B, Hq, D = q.shape
    group = Hq // k[0].shape[1]
    slopes = _slopes(Hq)
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = k[b].shape[0]
        k_pos = torch.arange(n, dtype=torch.float64)
        q_pos = float(n - 1)
        for h in range(Hq):
            kk, vv = k[b][:, h // group].double(), v[b][:, h // group].double()
            s = kk @ q[b, h].double() * scale
            visible = torch.ones(n, dtype=torch.bool)
            if variant.name == "softcap":
                s = variant.param * torch.tanh(s / variant.param)
            elif variant.name == "alibi":
                s = s + slopes[h] * (k_pos - q_pos)
            elif variant.name == "sliding_window":
                visible = (q_pos - k_pos) < variant.param
            if variant.name == "sigmoid":
                w = torch.sigmoid(s) * visible
            elif variant.name == "silu":
                w = s * torch.sigmoid(s) * visible / visible.sum()
            else:
                w = torch.softmax(s.masked_fill(~visible, float("-inf")), 0)
            out[b, h] = w @ vv
    return out


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize(("layout_name", "page_size"), LAYOUT_PAGES)
def test_decode_matches_float64_reference(layout_name: str, page_size: int, group: int) -> None:
    gen = torch.Generator().manual_seed(hash((layout_name, page_size, group)) % 2**31)
    dtype = torch.float32
    Hq, D = NUM_KV_HEADS * group, HEAD_DIM
    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, D, str(dtype))
    k = [torch.randn(n, NUM_KV_HEADS, D, generator=gen) for n in SEQ_LENS]
    v = [torch.randn(n, NUM_KV_HEADS, D, generator=gen) for n in SEQ_LENS]
    q = torch.randn(len(SEQ_LENS), Hq, D, generator=gen) * 2.0
    k_cache, v_cache, table = _paged(k, v, layout, gen, dtype)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    slopes = _slopes(Hq).float()
    scale = D**-0.5
    buffers = SplitBuffers.empty(q.device)
    for variant in VARIANTS:
        expected = _reference(q, k, v, scale, variant)
        runs = [(1, DEFAULT), (3, DEFAULT)]
        if layout_name == "hnd_x":  # the other hnd_x tile loads
            runs += [(3, DecodeConfig(16, 4, 1, x_mode=0)), (1, DecodeConfig(16, 4, 1, x_mode=1))]
        for splits, config in runs:
            out = torch.full_like(q, float("nan"))
            decode_attention(q, k_cache, v_cache, layout, table, seq_lens, out, scale,
                             triton_variant(variant), slopes, splits, buffers, config)
            assert not out.isnan().any(), f"{variant} splits={splits}: NaN in output"
            err = (out.double() - expected).norm() / expected.norm()
            assert err < 1e-5, f"{variant} {config} splits={splits}: relative error {err:.2e}"


def test_split_choice_fills_the_gpu() -> None:
    # a large batch needs no split; one long request is cut into many
    assert choose_num_splits(256, 8, 1024, num_sms=132, block_n=64) == 1
    assert choose_num_splits(64, 8, 4096, num_sms=132, block_n=64) == 1
    assert choose_num_splits(16, 8, 16384, num_sms=132, block_n=64) == 5
    assert choose_num_splits(1, 8, 32768, num_sms=132, block_n=64) >= 32
    # short sequences are never cut below min_tokens_per_split
    assert choose_num_splits(1, 8, 300, num_sms=132, block_n=64) == 2


def _pool(layout_name: str, page_size: int, num_pages: int) -> KVPool:
    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, HEAD_DIM, "float32")
    return KVPool(KVPoolConfig(layout, 1, num_pages, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize(("layout_name", "page_size"), [("nhd", 4), ("hnd_x", 8)])
def test_triton_backend_mixed_step_matches_reference_backend(layout_name: str,
                                                             page_size: int) -> None:
    """Two decodes (one long enough to be split) and one prefill chunk over a cached prefix,
    through plan + forward and plan + forward_rope, against the reference backend."""
    gen = torch.Generator().manual_seed(7)
    group = 3
    config = AttentionConfig(NUM_KV_HEADS * group, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM**-0.5,
                             Variant("softcap", 3.0))
    prefix = [29, 6, 9]
    q_lens = [1, 1, 5]
    num_pages = 40
    ids = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables = [[ids.pop() for _ in range(-(-(p + n) // page_size))]
              for p, n in zip(prefix, q_lens, strict=True)]
    batch = ForwardBatch.build(q_lens, prefix, tables, page_size, torch.device("cpu"))
    pools = [_pool(layout_name, page_size, num_pages) for _ in range(2)]
    # identical cached prefixes in both pools
    for p, pages in zip(prefix, tables, strict=True):
        pos = torch.arange(p)
        slots = torch.tensor(pages)[pos // page_size] * page_size + pos % page_size
        kv = torch.randn(2, p, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        for pool in pools:
            pool.store(0, kv[0], kv[1], slots)
    T = batch.num_tokens
    q = torch.randn(T, config.num_q_heads, HEAD_DIM, generator=gen)
    k = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(T, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    triton_backend, reference = TritonBackend(config, pools[0]), ReferenceBackend(config, pools[1])
    triton_backend.num_sms = 64  # a small batch on a big GPU: forces several splits
    triton_backend.min_tokens_per_split = 8
    for backend in (triton_backend, reference):
        backend.plan(batch)
    assert triton_backend.num_splits > 1
    got = triton_backend.forward(q, k, v, 0)
    want = reference.forward(q.double(), k.double(), v.double(), 0)
    assert not got.isnan().any()
    assert (got.double() - want).norm() / want.norm() < 1e-5

    # fused rotary: rotate in float64 here, then the reference backend attends
    positions = batch.positions
    inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos_sin[positions, None, : HEAD_DIM // 2], cos_sin[positions, None, HEAD_DIM // 2 :]
        x1, x2 = x.double()[..., : HEAD_DIM // 2], x.double()[..., HEAD_DIM // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    got = triton_backend.forward_rope(q, k, v, RopeInputs(positions, cos_sin.float()), 0)
    want = reference.forward(rotate(q), rotate(k), v.double(), 0)
    assert not got.isnan().any()
    assert (got.double() - want).norm() / want.norm() < 1e-5


def test_user_variant_from_module(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--attention-variant module:function`: a user's @triton.jit transform that halves the
    scores must equal softmax at half the scale."""
    (tmp_path / "user_transforms.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n"
        "@triton.jit\ndef half(s, q_pos, k_pos, slope, param):\n"
        "    return s * tl.full([1, 1], 0.5, tl.float32)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = torch.Generator().manual_seed(11)
    layout = KVLayout.create("hnd", 4, NUM_KV_HEADS, HEAD_DIM, "float32")
    k = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in SEQ_LENS]
    v = [torch.randn(n, NUM_KV_HEADS, HEAD_DIM, generator=gen) for n in SEQ_LENS]
    q = torch.randn(len(SEQ_LENS), 2 * NUM_KV_HEADS, HEAD_DIM, generator=gen)
    k_cache, v_cache, table = _paged(k, v, layout, gen, torch.float32)
    out = torch.full_like(q, float("nan"))
    tv = triton_variant(Variant("user_transforms:half"))
    decode_attention(q, k_cache, v_cache, layout, table, torch.tensor(SEQ_LENS, dtype=torch.int32),
                     out, 0.25, tv, None, 2, SplitBuffers.empty(q.device), DEFAULT)
    expected = _reference(q, k, v, 0.125, Variant("softmax"))
    assert (out.double() - expected).norm() / expected.norm() < 1e-5
    with pytest.raises(ValueError, match="triton.jit"):
        triton_variant(Variant("math:sqrt"))


@pytest.mark.parametrize("layout_name, page_size", [("token", 1), ("hnd_x", 8)])
def test_warmup_launches_every_split_bound_up_to_the_maximum(
    layout_name: str, page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warmup_decode runs the direct kernel and one split launch per power-of-two bound
    (each a distinct merge-kernel instance on the GPU), ending at the maximum."""
    import attention.triton.decode as decode_module

    layout = KVLayout.create(layout_name, page_size, NUM_KV_HEADS, HEAD_DIM, "float32")
    calls: list[int] = []
    real = decode_module.decode_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[10])  # num_splits
        out = real(*args, **kwargs)
        assert torch.isfinite(out).all()
        return out

    monkeypatch.setattr(decode_module, "decode_attention", spy)
    buffers = SplitBuffers.empty(torch.device("cpu"))
    warmup_decode(layout, NUM_KV_HEADS * 3, triton_variant(Variant("softmax")),
                  torch.device("cpu"), torch.float32, DecodeConfig(16, 4, 1), 12, buffers)
    assert calls == [1, 2, 4, 8, 12]
    assert buffers.part_stat.numel() >= NUM_KV_HEADS * 3 * 12
