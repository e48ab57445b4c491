"""Lightning (linear) attention over the state pool, and the backend a hybrid model calls.

`LightningBackend` serves the lightning layers of one step: the step's decode rows (one
token each) go through the batched decode op, the rest (prefill and extend chunks) through
the chunked extend op, which also writes the prefix cache's state snapshots. Both update
each sequence's state slot in place (kvcache/state_pool.py). Its ops are `reference` (torch,
the oracle and the CPU path) or `triton` (attention/linear/).

`HybridStateBackend` is what a hybrid model's forward receives: the step's softmax backend
for the softmax layers (the whole contract is forwarded to it) plus `attend_linear` for the
lightning layers. Layer hooks (timing) see the model's layer index for both kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import ClassVar

import torch

from attention.base import AttentionBackend, BackendCapabilities, RopeInputs
from attention.batch import ForwardBatch
from attention.linear import (
    SNAPSHOT_ALIGN,
    lightning_decode,
    lightning_decode_reference,
    lightning_extend,
    lightning_extend_reference,
)
from kvcache.state_pool import StatePool

LINEAR_IMPLS: tuple[str, ...] = ("reference", "triton")

ExtendOp = Callable[..., torch.Tensor]
DecodeOp = Callable[..., torch.Tensor]


def linear_ops(impl: str) -> tuple[ExtendOp, DecodeOp]:
    if impl == "reference":
        return _reference_extend, lightning_decode_reference
    if impl == "triton":
        return lightning_extend, lightning_decode
    raise ValueError(f"unknown linear attention backend {impl!r} (choose from {list(LINEAR_IMPLS)})")


def _reference_extend(*args: object, prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
    """The reference reads the host lengths; the device copy is the kernels'."""
    return lightning_extend_reference(*args)  # type: ignore[arg-type]


def default_linear_impl(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "reference"


class LightningBackend:
    """The lightning layers of a step. `plan` once per step, `forward` once per layer."""

    def __init__(self, impl: str, pool: StatePool, snapshot_every: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        if snapshot_every < 0 or snapshot_every % SNAPSHOT_ALIGN:
            raise ValueError(f"--state-snapshot-interval {snapshot_every}: must be a multiple "
                             f"of {SNAPSHOT_ALIGN}")
        self.name = impl
        self.pool = pool
        self.dtype = dtype  # the model's activations: q, k, v arrive in it
        self.snapshot_every = snapshot_every
        self._extend, self._decode = linear_ops(impl)
        self.batch: ForwardBatch | None = None

    def warm_up(self) -> None:
        """Build the extend kernel's snapshot instances (one snapshot column, and several)
        on the scratch slot: the runner's one-token warm-up steps cross no snapshot point,
        and a serving step that built them would stall on the compile."""
        n = self.snapshot_every
        if n <= 0:
            return
        spec, dev = self.pool.spec, self.pool.device
        states = self.pool.layer(0)
        slopes = torch.ones(spec.num_heads, dtype=torch.float32, device=dev)
        for crossings in (1, 2):
            T = crossings * n
            q = torch.zeros(T, spec.num_heads, spec.head_dim, dtype=self.dtype, device=dev)
            ptr = torch.tensor([0, T], dtype=torch.int32, device=dev)
            slots = torch.zeros(1, dtype=torch.int32, device=dev)
            snaps = torch.zeros(1, crossings, dtype=torch.int32, device=dev)
            self._extend(q, q, q, ptr, [0, T], [0], slopes, states, slots, n, snaps)
        states[0].zero_()

    def plan(self, batch: ForwardBatch) -> None:
        if batch.state_slots is None:
            raise ValueError("a hybrid model's step needs state slots in its ForwardBatch")
        self.batch = batch
        n = batch.num_decodes
        self._decode_slots = batch.state_slots[:n]
        ptr = batch.qo_indptr_host
        self._extend_ptr_host = [p - ptr[n] for p in ptr[n:]]
        self._extend_prefix = batch.prefix_lens_host[n:]
        self._extend_ptr = self._extend_slots = self._extend_prefix_dev = None
        self._snapshots = None
        if batch.num_prefills:
            # fresh tensors, not slices at row n: Triton specialises a kernel on whether each
            # pointer is 16-byte aligned, and a slice's alignment follows the decode count
            # (each new combination was a compile in a serving step)
            self._extend_ptr = batch.qo_indptr[n:] - ptr[n]
            self._extend_slots = batch.state_slots[n:].clone()
            self._extend_prefix_dev = batch.prefix_lens[n:].clone()  # the kernels read these
            if batch.snapshot_slots is not None:
                self._snapshots = batch.snapshot_slots[n:].clone()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                layer: int) -> torch.Tensor:
        """q, k, v [T, H, D] (activated) -> [T, H, D]; the step's sequences' states advance."""
        batch = self.batch
        assert batch is not None, "plan() first"
        states = self.pool.layer(layer)
        n = batch.num_decodes
        parts: list[torch.Tensor] = []
        if n:
            parts.append(self._decode(q[:n], k[:n], v[:n], slopes, states, self._decode_slots))
        if batch.num_prefills:
            every = self.snapshot_every if self._snapshots is not None else 0
            parts.append(self._extend(q[n:], k[n:], v[n:], self._extend_ptr,
                                      self._extend_ptr_host, self._extend_prefix, slopes,
                                      states, self._extend_slots, every, self._snapshots,
                                      prefix_lens=self._extend_prefix_dev))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class HybridStateBackend(AttentionBackend):
    """Softmax layers -> `softmax` (a paged-KV backend), lightning layers -> `linear`.

    `softmax_layers[i]` / `linear_layers[i]` is the model layer of pool index i of each
    kind, which is what the layer hook is told."""

    supported_layouts: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, softmax: AttentionBackend, linear: LightningBackend,
                 softmax_layers: list[int], linear_layers: list[int]) -> None:
        self.supported_layouts = softmax.supported_layouts  # type: ignore[misc]
        super().__init__(softmax.config, softmax.pool)
        self.softmax = softmax
        self.linear = linear
        self.softmax_layers = softmax_layers
        self.linear_layers = linear_layers
        self.name = softmax.name  # type: ignore[misc]
        # the decode op is graph-safe; the graphs stage each row's state slot
        # (model/cuda_graphs.py), so the softmax backend decides
        self.capabilities = BackendCapabilities(
            fused_rope_store=softmax.capabilities.fused_rope_store,
            cuda_graphs=softmax.capabilities.cuda_graphs)

    @property
    def layer_kinds(self) -> list[str]:
        """Each model layer's kind, 'softmax' or 'linear' (what timing splits by)."""
        kinds = ["softmax"] * (len(self.softmax_layers) + len(self.linear_layers))
        for i in self.linear_layers:
            kinds[i] = "linear"
        return kinds

    def warm_up(self) -> None:
        self.softmax.warm_up()
        self.linear.warm_up()

    def cuda_graph_context_lengths(self, max_model_len: int) -> list[int]:
        return self.softmax.cuda_graph_context_lengths(max_model_len)

    def prepare_cuda_graphs(self, max_batch: int, max_model_len: int) -> None:
        self.softmax.prepare_cuda_graphs(max_batch, max_model_len)

    def plan(self, batch: ForwardBatch, graph_mode: bool = False) -> None:
        super().plan(batch, graph_mode)
        self.softmax.plan(batch, graph_mode)
        self.linear.plan(batch)

    def graph_key(self) -> Hashable:
        return self.softmax.graph_key()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               rope: RopeInputs | None = None) -> torch.Tensor:
        hook = self._layer_hook
        if hook is not None:
            hook.begin(self.softmax_layers[layer])
        out = self.forward(q, k, v, layer) if rope is None \
            else self.forward_rope(q, k, v, rope, layer)
        if hook is not None:
            hook.end(self.softmax_layers[layer])
        return out

    def attend_linear(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slopes: torch.Tensor, layer: int) -> torch.Tensor:
        hook = self._layer_hook
        if hook is not None:
            hook.begin(self.linear_layers[layer])
        out = self.linear.forward(q, k, v, slopes, layer)
        if hook is not None:
            hook.end(self.linear_layers[layer])
        return out

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        return self.softmax.forward(q, k, v, layer)

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: RopeInputs, layer: int) -> torch.Tensor:
        return self.softmax.forward_rope(q, k, v, rope, layer)
