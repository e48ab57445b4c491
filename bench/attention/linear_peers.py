"""Peers of the lightning-attention kernels for `bench attention --op linear-*`: the torch
reference and flash-linear-attention (`fla-core`) when it is importable.

fla computes the same recurrence as its "simple GLA" with a per-head constant log-decay
g_gamma = -lam and scale 1.0: `chunk_simple_gla` for prefill (ragged through cu_seqlens,
initial states in, final states out) and `fused_recurrent_simple_gla` for one-token
decode. Its states are dense [B, H, D, D] tensors, not slots of a pool: the decode peer
reads B states and writes B new ones, the same bytes as the pool kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Runner = Callable[[], Any]


class PeerUnavailable(RuntimeError):
    """A peer kernel that cannot run here (not importable, or off the reference)."""


def fla_version() -> str:
    try:
        import fla
    except ImportError as exc:
        raise PeerUnavailable(f"fla-core is not importable: {exc}") from exc
    return str(getattr(fla, "__version__", "unknown"))


def fla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indptr: list[int],
                slopes: torch.Tensor, init: torch.Tensor
                ) -> tuple[Runner, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """q, k, v [T, H, D] ragged by `indptr`, init [B, H, D, D] float32 -> (timed call,
    call returning (out [T, H, D], final states [B, H, D, D]))."""
    fla_version()
    from fla.ops.simple_gla import chunk_simple_gla

    cu_cpu = torch.tensor(indptr, dtype=torch.long)
    cu = cu_cpu.to(q.device)
    g_gamma = -slopes

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        o, final = chunk_simple_gla(q[None], k[None], v[None], g_gamma=g_gamma, scale=1.0,
                                    initial_state=init, output_final_state=True,
                                    cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
        return o[0], final

    return call, call


def fla_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
               init: torch.Tensor
               ) -> tuple[Runner, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """q, k, v [B, H, D], init [B, H, D, D] float32 -> (timed call, call -> (out, states))."""
    fla_version()
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    g_gamma = -slopes

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        o, final = fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None],
                                              g_gamma=g_gamma, scale=1.0, initial_state=init,
                                              output_final_state=True)
        return o[:, 0], final

    return call, call


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float32."""
    want = want.float()
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
