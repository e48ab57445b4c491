"""Which part of the Llama family's weights a tensor-parallel rank holds (Megatron-style).

- q/k/v and gate/up are column-parallel: rank r computes its query heads, the KV heads they
  read and its slice of the MLP's intermediate columns, with no communication;
- o and down are row-parallel: each rank multiplies its slice of the input columns and the
  partial sums are all-reduced (layers.py);
- the embedding and the LM head are vocab-parallel: rank r holds a range of
  ceil(vocab / size) rows (the last range padded with zero rows).

KV heads: with at least as many KV heads as ranks each rank holds `kv_heads / size` of them;
with fewer, each KV head is replicated on `size / kv_heads` ranks, every rank holding the one
head its query heads read. A model whose head counts or MLP width do not divide is refused
with a message that says what would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from model.config import ModelConfig

MAX_HINTED_SIZE = 16  # a refusal lists the sizes up to this that would split


class TensorParallelUnsupported(ValueError):
    """This model cannot be split over this many ranks (a one-line reason)."""


def check_splittable(config: object, size: int) -> None:
    """Raise TensorParallelUnsupported unless `config` (a model family's config) splits over
    `size` ranks. Only the Llama family (ModelConfig) is split."""
    if size == 1:
        return
    if type(config) is not ModelConfig:
        arch = getattr(config, "architecture", type(config).__name__)
        raise TensorParallelUnsupported(
            f"--tensor-parallel-size {size}: {arch} models are not split over ranks yet; only "
            "the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) is. Use "
            "--tensor-parallel-size 1")
    problems = _split_problems(config, size)
    if problems:
        fits = [n for n in range(1, MAX_HINTED_SIZE + 1) if not _split_problems(config, n)]
        raise TensorParallelUnsupported(
            f"--tensor-parallel-size {size}: " + "; ".join(problems)
            + f" (sizes up to {MAX_HINTED_SIZE} this model splits into: "
            + ", ".join(map(str, fits)) + ")")


def _split_problems(config: ModelConfig, size: int) -> list[str]:
    heads, kv = config.num_heads, config.num_kv_heads
    problems = []
    if heads % size:
        problems.append(f"{heads} query heads do not divide into {size} ranks")
    if kv >= size and kv % size:
        problems.append(f"{kv} KV heads do not divide into {size} ranks")
    if kv < size and size % kv:
        problems.append(f"{size} ranks are not a multiple of the {kv} KV heads (each KV "
                        "head is replicated on size / kv_heads ranks)")
    if config.intermediate_size % size:
        problems.append(f"the MLP width {config.intermediate_size} does not divide into "
                        f"{size} ranks")
    return problems


@dataclass(frozen=True)
class TPShard:
    """Rank `rank`'s part of a model of `config` (the whole model's) split over `size`."""

    config: ModelConfig
    rank: int
    size: int

    def __post_init__(self) -> None:
        check_splittable(self.config, self.size)

    # ---- sizes on this rank --------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.size)

    @property
    def first_head(self) -> int:
        return self.rank * self.num_heads

    @property
    def first_kv_head(self) -> int:
        """The first KV head this rank holds: its own range, or (replicated) the head its
        query heads read."""
        kv = self.config.num_kv_heads
        if kv >= self.size:
            return self.rank * self.num_kv_heads
        return self.rank * kv // self.size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def vocab_end(self) -> int:
        """One past the last real vocabulary row of this rank (padding rows follow)."""
        return min(self.config.vocab_size, self.vocab_start + self.vocab_per_rank)

    def local_config(self) -> ModelConfig:
        """The config of this rank's layers: its heads and MLP width (the vocabulary stays
        the model's: the embedding and LM head know their own range)."""
        return dataclasses.replace(self.config, num_heads=self.num_heads,
                                   num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size)

    # ---- slicing whole tensors -------------------------------------------------------------
    def _rows(self, t: torch.Tensor, first: int, count: int, dim: int = 0) -> torch.Tensor:
        return t.narrow(dim, first, count)

    def q_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        d = self.config.head_dim
        return self._rows(t, self.first_head * d, self.num_heads * d, dim)

    def kv_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        d = self.config.head_dim
        return self._rows(t, self.first_kv_head * d, self.num_kv_heads * d, dim)

    def mlp_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        n = self.intermediate_size
        return self._rows(t, self.rank * n, n, dim)

    def vocab_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an embedding or LM head, padded with zero rows."""
        part = t[self.vocab_start : self.vocab_end]
        pad = self.vocab_per_rank - part.shape[0]
        if pad == 0:
            return part
        return torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])

    def checkpoint_part(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (Hugging Face Llama names), whole
        tensors (norms) as they are."""
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return self.vocab_rows(t)
        if ".self_attn.q_proj." in name:
            return self.q_rows(t)
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return self.kv_rows(t)
        if ".self_attn.o_proj." in name:
            return self.q_rows(t, dim=1)
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            return self.mlp_rows(t)
        if ".mlp.down_proj." in name:
            return self.mlp_rows(t, dim=1)
        return t

    # ---- our own (fused) parameters, for synthetic weights drawn whole ----------------------
    def full_shape(self, param: str, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole model's shape of our parameter `param`, of which this rank holds
        `local_shape`."""
        c = self.config
        if param.endswith(("embed_tokens.weight", "lm_head.weight")):
            return (c.vocab_size, *local_shape[1:])
        if param.endswith("qkv_proj.weight") or param.endswith("qkv_proj.bias"):
            return (c.q_size + 2 * c.kv_size, *local_shape[1:])
        if param.endswith("o_proj.weight"):
            return (local_shape[0], c.q_size)
        if param.endswith("gate_up_proj.weight"):
            return (2 * c.intermediate_size, *local_shape[1:])
        if param.endswith("down_proj.weight"):
            return (local_shape[0], c.intermediate_size)
        return local_shape

    def param_part(self, param: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of our parameter `param` given whole (`full_shape`)."""
        c = self.config
        if param.endswith(("embed_tokens.weight", "lm_head.weight")):
            return self.vocab_rows(full)
        if param.endswith("qkv_proj.weight") or param.endswith("qkv_proj.bias"):
            q, k, v = full.split([c.q_size, c.kv_size, c.kv_size])
            return torch.cat([self.q_rows(q), self.kv_rows(k), self.kv_rows(v)])
        if param.endswith("o_proj.weight"):
            return self.q_rows(full, dim=1)
        if param.endswith("gate_up_proj.weight"):
            gate, up = full.split([c.intermediate_size, c.intermediate_size])
            return torch.cat([self.mlp_rows(gate), self.mlp_rows(up)])
        if param.endswith("down_proj.weight"):
            return self.mlp_rows(full, dim=1)
        return full
