"""Plain-torch lightning attention: the oracle of the Triton kernels, and the CPU path.

Per head h with decay rate lam_h, a head_dim x head_dim state S:
    S_t = exp(-lam_h) S_{t-1} + k_t^T v_t,    o_t = q_t S_t
(no softmax, no scale). Extend folds each sequence in segments of at most REFERENCE_CHUNK
tokens, cut also at every snapshot position, in the state's dtype (float32, or float64
for tests); a segment's output is its intra-segment causal part under the decay mask plus
the queries against the incoming state.
"""

from __future__ import annotations

import torch

from attention.linear.args import (
    check_extend_args,
    check_out,
    check_qkv,
    check_states,
    snapshot_positions,
)

REFERENCE_CHUNK = 64


def fold_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                 lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [H, L, D], state [H, D, D], lam [H] -> (out [H, L, D], state after the L tokens)."""
    L = q.shape[1]
    i = torch.arange(L, device=q.device, dtype=q.dtype)
    rate = lam[:, None]
    inter = (q @ state) * torch.exp(-rate * (i + 1))[..., None]
    gap = i[:, None] - i[None, :]  # query row minus key row
    mask = torch.where(gap >= 0, torch.exp(-rate[..., None] * gap.clamp(min=0)), 0.0)
    intra = ((q @ k.transpose(1, 2)) * mask) @ v
    key_decay = torch.exp(-rate * (L - 1 - i))[..., None]
    new_state = torch.exp(-rate * L)[..., None] * state + (k * key_decay).transpose(1, 2) @ v
    return inter + intra, new_state


def _segment_cuts(start: int, end: int, every: int) -> list[int]:
    cuts = {start, end}
    cuts.update(range((start // REFERENCE_CHUNK + 1) * REFERENCE_CHUNK, end, REFERENCE_CHUNK))
    cuts.update(p for p in snapshot_positions(start, end - start, every) if p < end)
    return sorted(cuts)


def lightning_extend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               qo_indptr: torch.Tensor, qo_indptr_host: list[int],
                               prefix_lens_host: list[int], slopes: torch.Tensor,
                               states: torch.Tensor, state_slots: torch.Tensor,
                               snapshot_every: int = 0,
                               snapshot_slots: torch.Tensor | None = None,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Ragged extend; see `attention.linear` for the contract. Syncs the host (reads slots)."""
    check_extend_args(q, k, v, qo_indptr, qo_indptr_host, prefix_lens_host, slopes, states,
                      state_slots, snapshot_every, snapshot_slots)
    compute = states.dtype
    lam = slopes.to(compute)
    out = check_out(out, q)
    slots = state_slots.tolist()
    snaps = snapshot_slots.tolist() if snapshot_every else None
    for b, slot in enumerate(slots):
        lo, hi = qo_indptr_host[b], qo_indptr_host[b + 1]
        start = prefix_lens_host[b]
        state = states[slot].to(compute)
        cuts = _segment_cuts(start, start + hi - lo, snapshot_every)
        taken = 0
        for a, e in zip(cuts, cuts[1:], strict=False):
            rows = slice(lo + a - start, lo + e - start)
            qs, ks, vs = (t[rows].transpose(0, 1).to(compute) for t in (q, k, v))
            o, state = fold_segment(qs, ks, vs, state, lam)
            out[rows] = o.transpose(0, 1).to(q.dtype)
            if snaps is not None and e % snapshot_every == 0:
                target = snaps[b][taken]
                taken += 1
                if target >= 0:
                    states[target] = state.to(states.dtype)
        states[slot] = state.to(states.dtype)
    return out


def lightning_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               slopes: torch.Tensor, states: torch.Tensor,
                               state_slots: torch.Tensor,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence: q, k, v [B, H, D]; updates states[state_slots] in place."""
    check_qkv(q, k, v)
    check_states(states, slopes, q.shape[1], q.shape[2])
    compute = states.dtype
    idx = state_slots.long()
    decay = torch.exp(-slopes.to(compute))[None, :, None, None]
    kc, vc = k.to(compute), v.to(compute)
    state = decay * states[idx].to(compute) + kc[..., :, None] * vc[..., None, :]
    o = (q.to(compute)[..., None, :] @ state).squeeze(-2)
    states[idx] = state.to(states.dtype)
    result = check_out(out, q)
    result.copy_(o)
    return result
