"""The MLA backend contract: attention in the latent space, an MQA over the cached rows.

The model absorbs W_UK into its query (model/deepseek.py), so every head of a request
attends over the same cached rows (latent | rotary key, `kv_lora_rank + rope_dim` wide) and
reads the first `kv_lora_rank` columns as its value. An MLA backend is an
`AttentionBackend` whose pool is a `LatentPool`:

    forward(q [T, H, rank + rope], k [T, 1, rank + rope], v = k[..., :rank], layer)
        -> [T, H, rank]

storing k's rows at the batch's slot_mapping first. With `rope` (`forward_rope`), only the
last `rope_dim` columns of q and k are rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attention.base import AttentionBackend, AttentionConfig, RopeInputs
from attention.rotary import rotate
from kvcache.latent_pool import LatentPool


@dataclass(frozen=True)
class MLAConfig(AttentionConfig):
    """MQA in the latent space: one key head `kv_lora_rank + rope_dim` wide (head_dim),
    whose first `kv_lora_rank` columns are the value."""

    kv_lora_rank: int = 512
    rope_dim: int = 64
    cache_kind: ClassVar[str] = "latent"

    @classmethod
    def create(cls, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float) -> MLAConfig:
        return cls(num_q_heads=num_heads, num_kv_heads=1, head_dim=kv_lora_rank + rope_dim,
                   scale=scale, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)

    def __post_init__(self) -> None:
        if self.num_kv_heads != 1 or self.head_dim != self.kv_lora_rank + self.rope_dim:
            raise ValueError("an MLA config has one latent key head of kv_lora_rank + rope_dim")
        if self.variant.name != "softmax":
            raise ValueError("MLA backends serve the softmax variant only")


class MLABackend(AttentionBackend):
    """Base of the latent-cache backends (see the module docstring)."""

    supported_layouts: ClassVar[frozenset[str]] = frozenset({"latent"})
    supported_variants: ClassVar[frozenset[str] | None] = frozenset({"softmax"})
    config: MLAConfig
    pool: LatentPool  # type: ignore[assignment]

    def __init__(self, config: MLAConfig, pool: LatentPool) -> None:
        if not isinstance(config, MLAConfig):
            raise TypeError(f"{type(self).__name__} needs an MLAConfig")
        super().__init__(config, pool)  # type: ignore[arg-type]  # checks the layout
        if pool.layout.row_width != config.head_dim:
            raise ValueError(f"latent pool rows are {pool.layout.row_width} wide, the model's "
                             f"{config.head_dim}")

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rope: RopeInputs, layer: int) -> torch.Tensor:
        """Rotate the rotary columns of q and k in torch, then `forward`."""
        r = self.config.kv_lora_rank
        q = torch.cat([q[..., :r], rotate(q[..., r:], rope.positions, rope.cos_sin_cache)], -1)
        k = torch.cat([k[..., :r], rotate(k[..., r:], rope.positions, rope.cos_sin_cache)], -1)
        return self.forward(q, k, k[..., :r], layer)
