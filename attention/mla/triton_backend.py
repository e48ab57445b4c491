"""The `triton` backend for the MLA latent cache: the fused rotary + row store
(attention/mla/rope_store.py) and the absorbed attention kernel (attention/mla/kernels.py)
for both phases: decodes with split-KV, the prefill part with one split.

`plan` decides the decode split count from host lists (a power of two in CUDA-graph mode:
the graph key); `forward` never syncs and allocates only its output, the split scratch being
grown in `plan`.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from attention.base import BackendCapabilities, RopeInputs
from attention.batch import ForwardBatch
from attention.batch_slices import split_phases
from attention.mla.base import MLABackend, MLAConfig
from attention.mla.kernels import MLAKernelConfig, choose_num_splits, mla_attention
from attention.mla.rope_store import mla_rope_store
from attention.triton.decode import SplitBuffers, graph_context_lengths, graph_num_splits
from kvcache.latent_pool import LatentPool


class MLATritonBackend(MLABackend):
    name = "triton"
    capabilities = BackendCapabilities(fused_rope_store=True, cuda_graphs=True)

    def __init__(self, config: MLAConfig, pool: LatentPool) -> None:
        super().__init__(config, pool)
        self.device = pool.device
        on_gpu = self.device.type == "cuda"
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if on_gpu else 4)
        self.kernel_config = MLAKernelConfig.for_device(config.num_q_heads, on_gpu)
        self.split_buffers = SplitBuffers.empty(self.device)
        self.num_splits = 1
        self.min_tokens_per_split = 256
        self._decode: ForwardBatch | None = None
        self._prefill: ForwardBatch | None = None
        self._prefill_offset = 0

    def warm_up(self) -> None:
        """Compile the instances a step launches: the store, attention with one split and
        with split counts 2, 4, ... (merge instances per power-of-two bound)."""
        if self.device.type != "cuda":
            return
        r, H = self.config.kv_lora_rank, self.config.num_q_heads
        dtype = self.pool.dtype
        q = torch.zeros(1, H, self.config.head_dim, dtype=dtype, device=self.device)
        k = torch.zeros(1, 1, self.config.head_dim, dtype=dtype, device=self.device)
        ints = {"device": self.device, "dtype": torch.int32}
        indptr, lens, table = (torch.tensor([0, 1], **ints), torch.ones(1, **ints),
                               torch.zeros(1, 1, **ints))
        out = q.new_empty(1, H, r)
        mla_attention(q, self.pool.caches[0], r, indptr, lens, table, out, self.config.scale, 1)
        slots = torch.zeros(1, dtype=torch.int64, device=self.device)
        cos_sin = torch.zeros(1, self.config.rope_dim, device=self.device)
        cache = self.pool.caches[0]
        mla_rope_store(q, k, r, slots, cache, slots, cos_sin)
        mla_rope_store(q, k, r, slots, cache)
        splits = 1
        while splits <= self.kernel_config.max_splits:
            mla_attention(q, cache, r, None, lens, table, out, self.config.scale, 1, splits,
                          self.split_buffers, self.kernel_config)
            splits *= 2

    # ------------------------------------------------------------------ per step

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self._decode, self._prefill = split_phases(batch)
        self._prefill_offset = batch.qo_indptr_host[batch.num_decodes]
        if self._decode is not None:
            dec = self._decode
            self.num_splits = self._splits(dec.num_seqs, dec.max_seq_len, graph_mode)
            if self.num_splits > 1:
                self.split_buffers.ensure(dec.num_seqs, self.config.num_q_heads,
                                          self.num_splits, self.config.kv_lora_rank)

    def _splits(self, num_seqs: int, max_seq_len: int, graph_mode: bool) -> int:
        splits = choose_num_splits(num_seqs, self.config.num_q_heads, max_seq_len, self.num_sms,
                                   self.kernel_config, self.min_tokens_per_split)
        return graph_num_splits(splits) if graph_mode else splits

    def graph_key(self) -> Hashable:
        return self.num_splits

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        unit = max(self.kernel_config.block_n, self.min_tokens_per_split)
        return graph_context_lengths(unit, max_model_len)

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        rows = max(b * self._splits(b, max_model_len, True) for b in range(1, max_batch + 1))
        self.split_buffers.ensure(rows, self.config.num_q_heads, 1, self.config.kv_lora_rank)
        self.split_buffers.keep_retired = True

    # ------------------------------------------------------------------ per layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: int) -> torch.Tensor:
        assert self.batch is not None, "plan() must run before forward()"
        mla_rope_store(q, k, self.config.kv_lora_rank, self.batch.slot_mapping,
                       self.pool.caches[layer])
        return self._attend(q, layer)

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: RopeInputs, layer: int) -> torch.Tensor:
        """One kernel rotates q's and k's rotary columns (q in place) and stores k's row."""
        assert self.batch is not None, "plan() must run before forward_rope()"
        mla_rope_store(q, k, self.config.kv_lora_rank, self.batch.slot_mapping,
                       self.pool.caches[layer], rope.positions, rope.cos_sin_cache)
        return self._attend(q, layer)

    def _attend(self, q: torch.Tensor, layer: int) -> torch.Tensor:
        r = self.config.kv_lora_rank
        out = q.new_empty(q.shape[0], q.shape[1], r)
        cache = self.pool.caches[layer]
        dec = self._decode
        if dec is not None:
            n = dec.num_tokens
            mla_attention(q[:n], cache, r, None, dec.seq_lens, dec.block_table,
                          out[:n], self.config.scale, 1, self.num_splits, self.split_buffers,
                          self.kernel_config)
        pre = self._prefill
        if pre is not None:
            t0 = self._prefill_offset
            mla_attention(q[t0:], cache, r, pre.qo_indptr, pre.seq_lens, pre.block_table,
                          out[t0:], self.config.scale, pre.max_q_len, 1, None,
                          self.kernel_config)
        return out
