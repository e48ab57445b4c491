"""A hybrid backend: one backend for the decode part of a step, another for prefill."""

from __future__ import annotations

import torch

from attention.base import AttentionBackend, AttentionConfig, create_backend
from attention.batch import ForwardBatch
from attention.batch_slices import split_phases
from kvcache.pool import KVPool


class HybridBackend(AttentionBackend):
    """Decodes (the first `num_decodes` sequences) go to `decode`, the rest to `prefill`."""

    name = "hybrid"
    supported_layouts = frozenset(["token", "nhd", "hnd", "hnd_x"])

    def __init__(
        self, config: AttentionConfig, pool: KVPool, prefill_backend: str, decode_backend: str
    ) -> None:
        super().__init__(config, pool)
        self.prefill = create_backend(prefill_backend, config, pool)
        self.decode = create_backend(decode_backend, config, pool)
        self.name = f"{prefill_backend}+{decode_backend}"  # type: ignore[misc]
        self._split: tuple[ForwardBatch | None, ForwardBatch | None] = (None, None)

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        self._split = split_phases(batch)
        dec, pre = self._split
        if dec is not None:
            self.decode.plan(dec)
        if pre is not None:
            self.prefill.plan(pre)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        dec, pre = self._split
        if pre is None:
            return self.decode.forward(q, k, v, layer)
        if dec is None:
            return self.prefill.forward(q, k, v, layer)
        n = dec.num_tokens
        return torch.cat(
            [self.decode.forward(q[:n], k[:n], v[:n], layer),
             self.prefill.forward(q[n:], k[n:], v[n:], layer)]
        )


def build_attention_backend(
    config: AttentionConfig,
    pool: KVPool,
    backend: str,
    prefill_backend: str | None = None,
    decode_backend: str | None = None,
) -> AttentionBackend:
    """`--attention-backend`, optionally overridden per phase by `--prefill-backend` /
    `--decode-backend`."""
    pre = prefill_backend or backend
    dec = decode_backend or backend
    if pre == dec:
        return create_backend(pre, config, pool)
    return HybridBackend(config, pool, pre, dec)
