"""The variant table: parsing, parameters, and what each backend and kernel reads from it.

Whether each variant computes the right thing is checked against the float64 oracle in
test_reference_backend.py (every peer, every variant the table says it expresses) and in
the Triton kernel tests; the oracles there name the variants themselves, independently of
this table."""

from __future__ import annotations

import pytest
import torch

from attention import AttentionConfig, create_backend
from attention.triton.variants import TRANSFORMS, identity, triton_variant
from attention.variants import BUILTIN_VARIANTS, Variant, parse_variant, variants_of_peer
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig


def test_parse_builtins_and_their_parameters() -> None:
    assert parse_variant("softmax") == Variant("softmax")
    assert parse_variant("softcap") == Variant("softcap", 30.0)
    assert parse_variant("softcap:50") == Variant("softcap", 50.0)
    assert parse_variant(" sliding_window:256 ").window == 256
    assert parse_variant("pkg.mod:fn") == Variant("pkg.mod:fn")
    with pytest.raises(ValueError, match="needs a window"):
        parse_variant("sliding_window")
    with pytest.raises(ValueError, match="whole number"):
        parse_variant("sliding_window:2.5")
    with pytest.raises(ValueError, match="takes no parameter"):
        parse_variant("alibi:3")
    with pytest.raises(ValueError, match="positive cap"):
        Variant("softcap")
    with pytest.raises(ValueError, match="unknown attention variant"):
        parse_variant("cosine")


def test_fields_say_what_each_variant_does() -> None:
    assert Variant("softcap", 2.0).softcap == 2.0 and Variant("softmax").softcap is None
    assert Variant("sliding_window", 7.0).window == 7 and Variant("alibi").window is None
    assert [v for v in BUILTIN_VARIANTS if not Variant(v, 1.0).uses_softmax] == ["sigmoid", "silu"]
    assert [v for v in BUILTIN_VARIANTS if Variant(v, 1.0).needs_slopes] == ["alibi"]
    plain = [v for v in BUILTIN_VARIANTS
             if Variant(v, 1.0).uses_softmax and not Variant(v, 1.0).modifies_logits]
    assert plain == ["softmax"]
    user = Variant("pkg.mod:fn")  # a logits transform under softmax
    assert user.spec is None and user.uses_softmax and user.modifies_logits


def test_every_builtin_has_triton_transforms() -> None:
    assert set(TRANSFORMS) == set(BUILTIN_VARIANTS)
    for name in BUILTIN_VARIANTS:
        tv = triton_variant(Variant(name, 4.0))
        args = tv.kernel_args()
        assert args["USE_SOFTMAX"] is Variant(name, 4.0).uses_softmax
        # a softmax variant's weight hook is unused; a pointwise one's logits hook is plain
        assert (tv.weight is identity) == tv.uses_softmax
        assert tv.logits is identity or tv.uses_softmax


@pytest.mark.parametrize("backend", ["reference", "paged", "sdpa", "flex"])
def test_peers_serve_exactly_the_variants_the_table_gives_them(backend: str) -> None:
    layout = KVLayout.create("nhd", 4, 2, 16, "float32")
    pool = KVPool(KVPoolConfig(layout, 1, 4, torch.float32, torch.device("cpu")))
    every = ("reference", "paged")  # torch definitions of every built-in
    expressible = BUILTIN_VARIANTS if backend in every else variants_of_peer(backend)
    assert "softmax" in expressible
    for name in BUILTIN_VARIANTS:
        config = AttentionConfig(4, 2, 16, 0.25, Variant(name, 3.0))
        if name in expressible:
            create_backend(backend, config, pool)
        else:
            with pytest.raises(ValueError, match="does not support variant"):
                create_backend(backend, config, pool)
