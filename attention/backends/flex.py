"""FlexAttention (torch.nn.attention.flex_attention) as a peer backend.

Like `sdpa`, each phase group's paged K/V is gathered into a padded block, then attended;
the mask (causal, padding, sliding window) is a `BlockMask` built once per step in `plan`
from the group's visibility, so Flex skips the blocks no query may see, and softcap and
ALiBi are `score_mod` functions. Flex always normalises with softmax, so the pointwise
variants (sigmoid, silu) are not offered.

On a GPU `flex_attention` runs compiled (`torch.compile(..., dynamic=True)`, one compile
per shape class, most of them done when the backend is built; the H100 sweep still met two
classes later, logged as recompiles); on the CPU it runs eagerly (Flex's unfused path, which
materialises the scores: correct, not fast).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from attention.backends.reference import ReferenceBackend, _GroupPlan
from attention.base import AttentionConfig, BackendCapabilities
from attention.batch import ForwardBatch
from attention.variants import alibi_slopes, variants_of_peer
from kvcache.layout import LAYOUT_NAMES
from kvcache.pool import KVPool

ScoreMod = Callable[..., torch.Tensor]
_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_for(device: torch.device) -> Callable[..., torch.Tensor]:
    """Compiled Flex on CUDA (shared by every layer and engine), eager elsewhere."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


@dataclass
class _FlexGroup:
    """One phase group, padded so that batch, query and key lengths are all >= 2: compiled
    with dynamic shapes, Flex specialises on sizes of 1, and every extra shape class would be
    another compile."""

    token_offset: int
    num_tokens: int
    q_rows: torch.Tensor  # [B, Lq]
    q_valid: torch.Tensor  # [B, Lq]
    kv_slots: torch.Tensor  # [B, Lk]
    block_mask: BlockMask
    score_mod: ScoreMod | None


def _pad_to_two(t: torch.Tensor, dims: tuple[int, ...], value: Any) -> torch.Tensor:
    """Pad each listed dim of size 1 to 2 (repeating the edge, or with `value`)."""
    for d in dims:
        if t.shape[d] == 1:
            extra = torch.full_like(t.narrow(d, 0, 1), value) if value is not None else \
                t.narrow(d, 0, 1)
            t = torch.cat([t, extra], dim=d)
    return t


def _block_mask(allowed: torch.Tensor) -> BlockMask:
    """The Flex block mask of a [B, Lq, Lk] visibility tensor (the same for every head)."""
    B, Lq, Lk = allowed.shape

    def visible(b: Any, h: Any, q: Any, k: Any) -> torch.Tensor:
        return allowed[b, q, k]

    return create_block_mask(visible, B, None, Lq, Lk, device=allowed.device)


def _score_mod(config: AttentionConfig, q_pos: torch.Tensor, slopes: torch.Tensor
               ) -> ScoreMod | None:
    """The variant's logits transform as a Flex score_mod (None: plain softmax)."""
    variant = config.variant
    if variant.softcap is not None:
        cap = variant.softcap

        def softcap(score: torch.Tensor, b: Any, h: Any, q: Any, k: Any) -> torch.Tensor:
            return cap * torch.tanh(score / cap)

        return softcap
    if variant.needs_slopes:

        def alibi(score: torch.Tensor, b: Any, h: Any, q: Any, k: Any) -> torch.Tensor:
            return score + slopes[h] * (k - q_pos[b, q]).to(score.dtype)

        return alibi
    return None


def flex_group(
    group: _FlexGroup, q: torch.Tensor, pool: KVPool, layer: int, config: AttentionConfig,
) -> torch.Tensor:
    """Attention of one group -> [B, Lq, Hq, D] (padding rows are zeros); FP8 pages are
    dequantized into q's dtype as they are gathered."""
    B, Lq = group.q_rows.shape
    qg = q[group.q_rows].transpose(1, 2)  # [B, Hq, Lq, D]
    keys, vals = pool.gather(layer, group.kv_slots, q.dtype)
    keys, vals = keys.transpose(1, 2), vals.transpose(1, 2)  # [B, Hkv, Lk, D]
    with warnings.catch_warnings():  # eager (CPU) use warns that it is unfused, every call
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        out = _flex_for(q.device)(
            qg, keys, vals, score_mod=group.score_mod, block_mask=group.block_mask,
            scale=config.scale, enable_gqa=True,
        )
    return out.transpose(1, 2).reshape(B, Lq, config.num_q_heads, config.head_dim)


class FlexBackend(ReferenceBackend):
    name = "flex"
    capabilities = BackendCapabilities(fused_rope_store=False, cuda_graphs=False)
    supported_layouts = frozenset(LAYOUT_NAMES)
    supported_variants = variants_of_peer("flex")

    def __init__(self, config: AttentionConfig, pool: KVPool) -> None:
        super().__init__(config, pool)
        device = pool.k_caches[0].device if pool.k_caches else torch.device("cpu")
        self.slopes = alibi_slopes(config.num_q_heads).to(device, torch.float32)
        self.device = device
        self.flex_groups: list[_FlexGroup] = []

    def warm_up(self) -> None:
        if self.device.type == "cuda":
            self._compile_shape_classes(self.device, self.pool.config.dtype)

    def _compile_shape_classes(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compile Flex, in inference mode as the steps run, for the shape classes a step can
        meet: its guards single out fewer than 128 query rows (the decoding kernel), exactly
        one query block or one key block of 128, and sizes that happen to be equal (so no
        two sizes here are). A later recompile is logged."""
        torch._logging.set_logs(recompiles=True)
        # a shape class beyond the limit would silently run Flex uncompiled
        dynamo = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed over versions
            if hasattr(dynamo, name):
                setattr(dynamo, name, max(getattr(dynamo, name), 64))
        with torch.inference_mode():
            for B, Lq, Lk in ((3, 5, 300), (4, 6, 100), (5, 128, 700), (6, 200, 900),
                              (7, 130, 131)):
                self._run_dummy(device, dtype, B, Lq, Lk)
        torch.cuda.synchronize(device)

    def _run_dummy(self, device: torch.device, dtype: torch.dtype, B: int, Lq: int, Lk: int
                   ) -> None:
        """One causal Flex call of the given sizes on zeros."""
        cfg = self.config
        q = torch.zeros(B, cfg.num_q_heads, Lq, cfg.head_dim, dtype=dtype, device=device)
        kv = torch.zeros(B, cfg.num_kv_heads, Lk, cfg.head_dim, dtype=dtype, device=device)
        q_pos = (torch.arange(Lq, device=device) + (Lk - Lq)).expand(B, Lq)
        allowed = torch.arange(Lk, device=device)[None, None, :] <= q_pos[:, :, None]
        _flex_for(device)(q, kv, kv, score_mod=_score_mod(cfg, q_pos, self.slopes),
                          block_mask=_block_mask(allowed), scale=cfg.scale, enable_gqa=True)

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self.flex_groups = [self._plan_flex(g) for g in self.groups]

    def _plan_flex(self, plan: _GroupPlan) -> _FlexGroup:
        allowed = plan.visible[:, 0]  # [B, Lq, Lk]
        window = self.config.variant.window
        if window is not None:
            allowed = allowed & ((plan.q_pos - plan.k_pos)[:, 0] < window)
        block_mask = _block_mask(_pad_to_two(allowed, (0, 1, 2), False))
        q_pos = _pad_to_two(plan.q_pos[:, 0, :, 0], (0, 1), None)  # [B, Lq]
        return _FlexGroup(
            token_offset=plan.token_offset, num_tokens=plan.num_tokens,
            q_rows=_pad_to_two(plan.q_rows, (0, 1), None),
            q_valid=_pad_to_two(plan.q_valid, (0, 1), False),
            kv_slots=_pad_to_two(plan.kv_slots, (0, 1), None),
            block_mask=block_mask,
            score_mod=_score_mod(self.config, q_pos, self.slopes),
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        self.pool.store(layer, k, v, self.batch.slot_mapping)
        out = torch.empty_like(q)
        for g in self.flex_groups:
            start, n = g.token_offset, g.num_tokens
            o = flex_group(g, q[start : start + n], self.pool, layer, self.config)
            out[start : start + n] = o[g.q_valid]
        return out
