"""The `triton` backend: Triton kernels for the K/V store (optionally fused with rotary),
split-KV batch decode, and prefill/extend.

Decode sequences (the first `batch.num_decodes`) go to `attention.triton.decode`. The
prefill part goes to `attention.triton.extend.extend_attention` when that module imports,
else to the reference backend's batched torch path. `plan` decides the number of KV splits
from host lists only; `forward` never syncs the device, and the split-KV scratch is grown
in `plan`, never allocated per layer. FP8 pages are quantized by the store kernel and
dequantized in the attention kernels' registers (their scales passed beside the pages).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import torch

from attention.backends.reference import _GroupPlan, attend_group, plan_group
from attention.base import AttentionBackend, AttentionConfig, BackendCapabilities, RopeInputs
from attention.batch import ForwardBatch
from attention.batch_slices import split_phases
from attention.triton.decode import (
    DecodeConfig,
    SplitBuffers,
    decode_attention,
    default_decode_config,
    graph_context_lengths,
    graph_num_splits,
    warmup_decode,
)
from attention.triton.rope_store import rope_store, store_kv
from attention.triton.variants import triton_variant
from attention.variants import alibi_slopes
from kvcache.layout import LAYOUT_NAMES
from kvcache.pool import KVPool

logger = logging.getLogger(__name__)


def _load_extend() -> Any:
    """The extend kernel's entry point, or None when it is not available."""
    try:
        from attention.triton.extend import extend_attention
    except ImportError as exc:  # the prefill kernel is optional for this backend
        logger.info("triton extend kernel unavailable (%s): prefill uses the torch path", exc)
        return None
    return extend_attention


class TritonBackend(AttentionBackend):
    name = "triton"
    supported_layouts = frozenset(LAYOUT_NAMES)
    supported_variants = None  # built-ins and user `module:function` transforms
    capabilities = BackendCapabilities(fused_rope_store=True, cuda_graphs=True)

    def __init__(self, config: AttentionConfig, pool: KVPool) -> None:
        super().__init__(config, pool)
        device = pool.k_caches[0].device if pool.k_caches else torch.device("cpu")
        self.device = device
        self.variant = triton_variant(config.variant)  # resolves a user module:function
        self.slopes = alibi_slopes(config.num_q_heads).float().to(device)
        on_gpu = device.type == "cuda"
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 4
        )
        self.decode_config: DecodeConfig = default_decode_config(
            pool.layout, config.head_dim, on_gpu
        )
        self.split_buffers = SplitBuffers.empty(device)
        self.block_d = 1 << (config.head_dim - 1).bit_length()  # the kernels' padded head dim
        self.extend = _load_extend()
        self.num_splits = 1
        self.min_tokens_per_split = 256  # shorter splits cost more in merging than they gain
        self._decode: ForwardBatch | None = None
        self._prefill: ForwardBatch | None = None
        self._prefill_offset = 0
        self._prefill_group: _GroupPlan | None = None

    def warm_up(self) -> None:
        """Compile every kernel instance a step may launch, so no serving step waits on
        Triton (attnserve_kernel_compiles_total in /metrics counts any that do)."""
        if self.device.type != "cuda":
            return
        pool = self.pool
        dtype, pages = pool.config.dtype, dict(cache_dtype=pool.kv_dtype.dtype,
                                               with_scales=pool.kv_dtype.has_scales)
        try:
            warmup_decode(pool.layout, self.config.num_q_heads, self.variant, self.device, dtype,
                          self.decode_config, self.decode_config.max_splits, self.split_buffers,
                          **pages)
            if self.extend is not None:
                from attention.triton.extend import warmup_extend

                warmup_extend(pool.layout, self.config.num_q_heads, self.config.variant,
                              self.device, dtype, **pages)
        except Exception:  # a failed warm-up only costs compile time later, never a step
            logger.warning("kernel warm-up failed; kernels compile on first use", exc_info=True)

    # ------------------------------------------------------------------ per step

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self._decode, self._prefill = split_phases(batch)
        self._prefill_offset = batch.qo_indptr_host[batch.num_decodes]
        if self._decode is not None:
            dec = self._decode
            self.num_splits = self._splits(dec.num_seqs, dec.max_seq_len, graph_mode)
            if self.num_splits > 1:
                self.split_buffers.ensure(
                    dec.num_seqs, self.config.num_q_heads, self.num_splits, self.block_d
                )
        self._prefill_group = None
        if self._prefill is not None and self.extend is None:
            self._prefill_group = plan_group(self._prefill, self._prefill_offset)

    def _splits(self, num_seqs: int, max_seq_len: int, graph_mode: bool) -> int:
        splits = self.decode_config.num_splits(
            num_seqs, self.config.num_kv_heads, max_seq_len, self.num_sms,
            min_tokens_per_split=self.min_tokens_per_split,
        )
        return graph_num_splits(splits) if graph_mode else splits

    def graph_key(self) -> Hashable:
        return self.num_splits

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        unit = max(self.decode_config.block_n, self.min_tokens_per_split)
        return graph_context_lengths(unit, max_model_len)

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        # splits never decrease with the context length, so max_model_len is the worst case
        rows = max(b * self._splits(b, max_model_len, True) for b in range(1, max_batch + 1))
        self.split_buffers.ensure(rows, self.config.num_q_heads, 1, self.block_d)
        # eager decode steps larger than any graph may still grow the scratch later
        self.split_buffers.keep_retired = True

    # ------------------------------------------------------------------ per layer

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        store_kv(k, v, self.batch.slot_mapping, self.pool.k_caches[layer],
                 self.pool.v_caches[layer], self.pool.layout, *self.pool.scales(layer))
        return self._attend(q, layer)

    def forward_rope(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeInputs, layer: int,
    ) -> torch.Tensor:
        """One kernel rotates q and k, stores rotated k and v; then attend."""
        assert self.batch is not None, "plan() must run before forward_rope()"
        k_scales, v_scales = self.pool.scales(layer)
        q_rot = rope_store(q, k, v, rope.positions, rope.cos_sin_cache, self.batch.slot_mapping,
                           self.pool.k_caches[layer], self.pool.v_caches[layer], self.pool.layout,
                           k_scale=k_scales, v_scale=v_scales)
        return self._attend(q_rot, layer)

    def _attend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        out = torch.empty_like(q)
        k_cache, v_cache = self.pool.k_caches[layer], self.pool.v_caches[layer]
        k_scales, v_scales = self.pool.scales(layer)
        scale = self.config.scale
        dec = self._decode
        if dec is not None:
            n = dec.num_tokens
            decode_attention(
                q[:n], k_cache, v_cache, self.pool.layout, dec.block_table, dec.seq_lens,
                out[:n], scale, self.variant, self.slopes, self.num_splits,
                self.split_buffers, self.decode_config, k_scales, v_scales,
            )
        pre = self._prefill
        if pre is not None:
            t0 = self._prefill_offset
            if self.extend is not None:
                self.extend(
                    q[t0:], k_cache, v_cache, self.pool.layout, pre.qo_indptr, pre.prefix_lens,
                    pre.seq_lens, pre.block_table, out[t0:], scale, self.config.variant,
                    pre.max_q_len, self.slopes, k_scales, v_scales,
                )
            else:
                group = self._prefill_group
                assert group is not None
                compute = torch.float64 if q.dtype == torch.float64 else torch.float32
                o = attend_group(group, q[t0:], self.pool, layer, self.config, compute)
                out[t0:] = o[group.q_valid].to(q.dtype)
        return out
