"""A hybrid backend: one backend for the decode part of a step, another for prefill.

It forwards every part of the contract: a fused rotary store is used by whichever part has
one (the other rotates in torch), CUDA graphs (decode-only steps) and the graph key come
from the decode part, warm-up runs both.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from attention.base import AttentionBackend, BackendCapabilities, RopeInputs
from attention.batch import ForwardBatch
from attention.batch_slices import split_phases


class HybridBackend(AttentionBackend):
    """Decodes (the first `num_decodes` sequences) go to `decode`, the rest to `prefill`."""

    name = "hybrid"

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        if prefill.pool is not decode.pool or prefill.config != decode.config:
            raise ValueError("a hybrid's two backends must share one KV pool and config")
        self.supported_layouts = prefill.supported_layouts & decode.supported_layouts  # type: ignore[misc]
        super().__init__(prefill.config, prefill.pool)
        self.prefill = prefill
        self.decode = decode
        self.name = f"{prefill.name}+{decode.name}"  # type: ignore[misc]
        self.capabilities = BackendCapabilities(
            fused_rope_store=prefill.capabilities.fused_rope_store
            or decode.capabilities.fused_rope_store,
            cuda_graphs=decode.capabilities.cuda_graphs,  # graphs capture decode-only steps
        )
        self._split: tuple[ForwardBatch | None, ForwardBatch | None] = (None, None)

    def warm_up(self) -> None:
        self.prefill.warm_up()
        self.decode.warm_up()

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        return self.decode.cuda_graph_context_lengths(max_model_len)

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        self.decode.prepare_cuda_graphs(max_batch, max_model_len)

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self._split = split_phases(batch)
        dec, pre = self._split
        if dec is not None:
            self.decode.plan(dec, graph_mode)
        if pre is not None:
            self.prefill.plan(pre, graph_mode)

    def graph_key(self) -> Hashable:
        return self.decode.graph_key()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        return self._by_phase(lambda part, s: part.forward(q[s], k[s], v[s], layer))

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: RopeInputs, layer: int) -> torch.Tensor:
        def run(part: AttentionBackend, s: slice) -> torch.Tensor:
            part_rope = RopeInputs(rope.positions[s], rope.cos_sin_cache)
            return part.forward_rope(q[s], k[s], v[s], part_rope, layer)

        return self._by_phase(run)

    def _by_phase(self, run: Callable[[AttentionBackend, slice], torch.Tensor]) -> torch.Tensor:
        """`run(part, token_slice)` for each phase present, outputs concatenated in order."""
        dec, pre = self._split
        if pre is None:
            return run(self.decode, slice(None))
        if dec is None:
            return run(self.prefill, slice(None))
        n = dec.num_tokens
        return torch.cat([run(self.decode, slice(0, n)), run(self.prefill, slice(n, None))])
