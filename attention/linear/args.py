"""Argument checks and snapshot positions shared by the reference and the Triton kernels."""

from __future__ import annotations

import torch

# Absolute token counts at which the state can be snapshotted are multiples of this: the
# Triton extend kernel's chunks are aligned to absolute positions and its chunk divides it.
SNAPSHOT_ALIGN = 64


def snapshot_positions(prefix_len: int, q_len: int, every: int) -> list[int]:
    """Absolute token counts j*every with prefix_len < j*every <= prefix_len + q_len."""
    if every <= 0:
        return []
    first = prefix_len // every + 1
    last = (prefix_len + q_len) // every
    return [j * every for j in range(first, last + 1)]


def check_extend_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      qo_indptr: torch.Tensor, qo_indptr_host: list[int],
                      prefix_lens_host: list[int],
                      slopes: torch.Tensor, states: torch.Tensor, state_slots: torch.Tensor,
                      snapshot_every: int, snapshot_slots: torch.Tensor | None) -> None:
    """Shapes, dtypes and snapshot room; reads host lists only (no device sync)."""
    check_qkv(q, k, v)
    check_states(states, slopes, q.shape[1], q.shape[2])
    B = len(prefix_lens_host)
    if len(qo_indptr_host) != B + 1 or qo_indptr_host[0] != 0 or qo_indptr_host[-1] != q.shape[0]:
        raise ValueError(f"qo_indptr_host must be [0, ..., T={q.shape[0]}] with {B + 1} entries, "
                         f"got {len(qo_indptr_host)} entries ending at {qo_indptr_host[-1:]}")
    if qo_indptr.shape != (B + 1,) or qo_indptr.dtype != torch.int32:
        raise ValueError(f"qo_indptr must be int32 [{B + 1}], got {qo_indptr.dtype} "
                         f"{tuple(qo_indptr.shape)}")
    if any(b < a for a, b in zip(qo_indptr_host, qo_indptr_host[1:], strict=False)):
        raise ValueError("qo_indptr_host must be non-decreasing")
    if any(p < 0 for p in prefix_lens_host):
        raise ValueError("prefix lengths must be >= 0")
    if state_slots.shape != (B,) or state_slots.dtype != torch.int32:
        raise ValueError(f"state_slots must be int32 [{B}], got {state_slots.dtype} "
                         f"{tuple(state_slots.shape)}")
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
    if snapshot_every == 0:
        return
    if snapshot_slots is None or snapshot_slots.dim() != 2 or snapshot_slots.shape[0] != B \
            or snapshot_slots.dtype != torch.int32:
        raise ValueError("snapshot_every > 0 needs snapshot_slots int32 [B, S_max]")
    for b in range(B):
        q_len = qo_indptr_host[b + 1] - qo_indptr_host[b]
        n = len(snapshot_positions(prefix_lens_host[b], q_len, snapshot_every))
        if n > snapshot_slots.shape[1]:
            raise ValueError(f"sequence {b} crosses {n} snapshot points but snapshot_slots has "
                             f"{snapshot_slots.shape[1]} columns")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [T, H, D] shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a contiguous last dimension")


def check_states(states: torch.Tensor, slopes: torch.Tensor, num_heads: int,
                 head_dim: int) -> None:
    if states.dim() != 4 or tuple(states.shape[1:]) != (num_heads, head_dim, head_dim):
        raise ValueError(f"states must be [num_slots, {num_heads}, {head_dim}, {head_dim}], "
                         f"got {tuple(states.shape)}")
    if slopes.shape != (num_heads,) or slopes.dtype != torch.float32:
        raise ValueError(f"slopes must be float32 [{num_heads}], got {slopes.dtype} "
                         f"{tuple(slopes.shape)}")


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The caller's output buffer, checked, or a fresh one shaped and typed like q."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with a contiguous last dim, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out
