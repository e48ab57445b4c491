"""Token-by-token float64 lightning-attention recurrence: the oracle of the linear tests.

Independent of attention/linear: no chunks, no masks, one rank-1 update a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedCase:
    """A ragged extend problem, everything float64 on the CPU."""

    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor
    v: torch.Tensor
    lens: list[int]
    prefixes: list[int]
    slopes: torch.Tensor  # [H] float32
    init: torch.Tensor  # [B, H, D, D] initial states

    @property
    def indptr(self) -> list[int]:
        out = [0]
        for n in self.lens:
            out.append(out[-1] + n)
        return out


def random_case(lens: list[int], prefixes: list[int], H: int, D: int, seed: int,
                zero_init: bool = False) -> RaggedCase:
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    # MiniMax applies silu to q, k, v: mostly positive, order-1 values
    q, k, v = (torch.nn.functional.silu(torch.randn(T, H, D, generator=gen, dtype=torch.float64))
               for _ in range(3))
    slopes = (0.05 + torch.rand(H, generator=gen)).to(torch.float32)  # 0.05 .. 1.05
    init = torch.zeros(len(lens), H, D, D, dtype=torch.float64)
    if not zero_init:
        init = torch.randn(len(lens), H, D, D, generator=gen, dtype=torch.float64)
    return RaggedCase(q, k, v, lens, prefixes, slopes, init)


def recurrence(case: RaggedCase, every: int = 0
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[int, torch.Tensor]]]:
    """-> out [T, H, D], final state [H, D, D] of each sequence, and for each sequence the
    states after absolute token counts that are multiples of `every` (position -> state)."""
    decay = torch.exp(-case.slopes.to(torch.float64))[:, None, None]
    out = torch.empty_like(case.q)
    finals, snaps = [], []
    indptr = case.indptr
    for b in range(len(case.lens)):
        state = case.init[b].clone()
        taken: dict[int, torch.Tensor] = {}
        for t in range(indptr[b], indptr[b + 1]):
            state = decay * state + case.k[t][:, :, None] * case.v[t][:, None, :]
            out[t] = torch.einsum("hd,hde->he", case.q[t], state)
            pos = case.prefixes[b] + t - indptr[b] + 1
            if every and pos % every == 0:
                taken[pos] = state.clone()
        finals.append(state)
        snaps.append(taken)
    return out, finals, snaps


def as_inputs(case: RaggedCase, dtype: torch.dtype, packed: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RaggedCase]:
    """q, k, v in `dtype` (with packed: strided views of one [T, H, 3D] tensor, as the model's
    fused projection gives them), and the case with the rounded values the kernels see."""
    T, H, D = case.q.shape
    if packed:
        qkv = torch.cat([case.q, case.k, case.v], dim=-1).to(dtype)
        q, k, v = qkv.split(D, dim=-1)
    else:
        q, k, v = (t.to(dtype) for t in (case.q, case.k, case.v))
    rounded = RaggedCase(q.double(), k.double(), v.double(), case.lens, case.prefixes,
                         case.slopes, case.init)
    return q, k, v, rounded


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    """Within tol relative, with the absolute floor tol * the largest |want|."""
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(scale, 1e-30))


def check_extend(extend_fn, case: RaggedCase, dtype: torch.dtype, every: int, tol: float,
                 state_dtype: torch.dtype = torch.float32, packed: bool = False) -> None:
    """Run `extend_fn` (the reference or the kernel) on `case` in a NaN-filled state pool
    with a NaN-filled output and compare output, final states and snapshots with the
    recurrence. Snapshot slots are in the same pool; every third snapshot entry is -1
    (skipped), and every slot nobody owns must still be NaN afterwards."""
    from attention.linear import snapshot_positions

    B, H, D = len(case.lens), case.q.shape[1], case.q.shape[2]
    q, k, v, case = as_inputs(case, dtype, packed)
    positions = [snapshot_positions(p, n, every)
                 for p, n in zip(case.prefixes, case.lens, strict=True)]
    num_snaps = sum(len(p) for p in positions)
    num_slots = 1 + B + num_snaps + 3  # slot 0 and 3 more never owned
    gen = torch.Generator().manual_seed(len(case.lens) * 7919 + every)
    free = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
    states = torch.full((num_slots, H, D, D), float("nan"), dtype=state_dtype)
    seq_slots = [free.pop() for _ in range(B)]
    for b, s in enumerate(seq_slots):
        states[s] = case.init[b].to(state_dtype)
    cols = max([len(p) for p in positions] + [0]) + 1  # one spare column stays -1
    snap_slots = torch.full((B, cols), -1, dtype=torch.int32)
    expected_snaps: dict[int, torch.Tensor] = {}
    want, finals, snaps = recurrence(case, every)
    n = 0
    for b in range(B):
        assert positions[b] == sorted(snaps[b])
        for i, pos in enumerate(positions[b]):
            n += 1
            if n % 3 != 0:
                s = free.pop()
                snap_slots[b, i] = s
                expected_snaps[s] = snaps[b][pos]
    if every:
        assert expected_snaps and n > len(expected_snaps), "the case must take and skip snapshots"
    indptr = case.indptr
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    got = extend_fn(q, k, v, torch.tensor(indptr, dtype=torch.int32), indptr, case.prefixes,
                    case.slopes, states, torch.tensor(seq_slots, dtype=torch.int32),
                    snapshot_every=every, snapshot_slots=snap_slots if every else None, out=out)
    assert got.data_ptr() == out.data_ptr()
    close(out, want, tol)
    for b, s in enumerate(seq_slots):
        close(states[s], finals[b], tol)
    for s, st in expected_snaps.items():
        close(states[s], st, tol)
    owned = set(seq_slots) | set(expected_snaps)
    for s in range(num_slots):
        if s not in owned:
            assert torch.isnan(states[s]).all(), f"slot {s} was written"
