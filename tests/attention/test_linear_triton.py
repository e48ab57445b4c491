"""The Triton lightning-attention kernels under the CPU interpreter vs a token-by-token
float64 recurrence: ragged extend (lengths 1 and off the chunk grid, prefixes inside
chunks, nonzero initial states, packed q/k/v views), snapshots inside and across chunks
with skipped entries, NaN-poisoned outputs and state pools, bf16 and float32 inputs;
batched decode with padded rows on a scratch slot; extend then decode equal to one extend."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from attention.linear import (  # noqa: E402
    DecodeConfig,
    ExtendConfig,
    lightning_decode,
    lightning_decode_reference,
    lightning_extend,
)
from tests.attention.linear_oracle import (  # noqa: E402
    as_inputs,
    check_extend,
    close,
    random_case,
    recurrence,
)

# float32 dots are exact; bf16 rounds the state, the decayed scores and keys to bf16
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _extend_with(config: ExtendConfig):
    def run(*args, **kwargs):
        return lightning_extend(*args, **kwargs, config=config)
    return run


@pytest.mark.parametrize("dtype,chunk,block_v", [
    (torch.float32, 16, 16), (torch.float32, 32, 8), (torch.bfloat16, 16, 16),
    (torch.bfloat16, 32, 8), (torch.float16, 16, 8)])
def test_extend_matches_recurrence(dtype, chunk, block_v):
    # lengths 1 and off the chunk grid; prefixes that start inside a chunk
    case = random_case([1, 37, 16, 50, 5], [0, 3, 16, 21, 7], H=2, D=16, seed=11)
    check_extend(_extend_with(ExtendConfig(chunk, block_v, num_stages=1)), case, dtype, 0,
                 TOL[dtype], packed=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_snapshots(dtype):
    # every 64 tokens with 16-token chunks: snapshots at the end of chunks 4, 8, ... of the
    # absolute grid; one sequence takes three, one starts just before a snapshot point
    # (prefix 63), one just after (prefix 64), one ends exactly on one
    case = random_case([150, 3, 70, 64, 1], [10, 63, 64, 0, 127], H=2, D=16, seed=12)
    check_extend(_extend_with(ExtendConfig(16, 16, num_stages=1)), case, dtype, 64, TOL[dtype])


def test_extend_zero_length_and_fresh_state():
    case = random_case([0, 20, 0], [5, 0, 0], H=1, D=16, seed=13, zero_init=True)
    check_extend(_extend_with(ExtendConfig(16, 16, num_stages=1)), case, torch.float32, 0, 1e-4)


def test_extend_rejects_bad_snapshot_arguments():
    case = random_case([4], [0], H=1, D=16, seed=14)
    q, k, v, _ = as_inputs(case, torch.float32, packed=False)
    states = torch.zeros(4, 1, 16, 16)
    args = (q, k, v, torch.tensor([0, 4], dtype=torch.int32), [0, 4], [0], case.slopes, states,
            torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 64"):
        lightning_extend(*args, snapshot_every=32, snapshot_slots=torch.full((1, 1), -1,
                                                                             dtype=torch.int32))
    with pytest.raises(ValueError, match="snapshot_slots"):
        lightning_extend(*args, snapshot_every=64)
    with pytest.raises(ValueError, match="snapshot points"):
        lightning_extend(q, k, v, torch.tensor([0, 4], dtype=torch.int32), [0, 4], [62],
                         case.slopes, states, torch.tensor([1], dtype=torch.int32),
                         snapshot_every=64, snapshot_slots=torch.zeros((1, 0), dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_recurrence_with_padded_rows(dtype):
    H, D = 3, 32
    case = random_case([1, 1, 1, 1], [5, 0, 9, 2], H=H, D=D, seed=15)
    q, k, v, case = as_inputs(case, dtype, packed=True)
    want, finals, _ = recurrence(case)
    # rows 4 and 5 are graph padding on scratch slot 0, as are the real rows' neighbours
    pad = torch.randn(2, H, 3 * D).to(dtype).split(D, dim=-1)
    q, k, v = (torch.cat([t, p]) for t, p in zip((q, k, v), pad, strict=True))
    states = torch.full((8, H, D, D), float("nan"))
    slots = torch.tensor([6, 1, 3, 4, 0, 0], dtype=torch.int32)
    states[slots[:4].long()] = case.init.float()
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    config = DecodeConfig(block_v=8, block_k=16, num_warps=4)
    lightning_decode(q, k, v, case.slopes, states, slots, config=config, out=out)
    close(out[:4], want, TOL[dtype])
    close(states[slots[:4].long()], torch.stack(finals), TOL[dtype])
    assert torch.isnan(states[[2, 5, 7]]).all()
    # the reference gives the same on the same inputs (it is the model's CPU path)
    ref_states = torch.full((8, H, D, D), float("nan"))
    ref_states[slots[:4].long()] = case.init.float()
    ref = lightning_decode_reference(q, k, v, case.slopes, ref_states, slots)
    close(ref[:4], want, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_then_decode_equals_one_extend(dtype):
    H, D, steps = 2, 16, 3
    lens = [21, 1, 40]
    case = random_case([n + steps for n in lens], [0, 4, 60], H=H, D=D, seed=16)
    q, k, v, case = as_inputs(case, dtype, packed=False)
    want, finals, _ = recurrence(case)
    indptr = case.indptr
    states = torch.full((5, H, D, D), float("nan"))
    slots = torch.tensor([2, 4, 1], dtype=torch.int32)
    states[slots.long()] = case.init.float()
    head = torch.cat([torch.arange(indptr[b], indptr[b] + n) for b, n in enumerate(lens)])
    head_indptr = [0, *torch.tensor(lens).cumsum(0).tolist()]
    config = ExtendConfig(16, 16, num_stages=1)
    out_head = lightning_extend(q[head], k[head], v[head],
                                torch.tensor(head_indptr, dtype=torch.int32), head_indptr,
                                case.prefixes, case.slopes, states, slots, config=config)
    for b, n in enumerate(lens):
        close(out_head[head_indptr[b]:head_indptr[b + 1]], want[indptr[b]:indptr[b] + n],
              TOL[dtype])
    out_steps = []
    for step in range(steps):
        rows = torch.tensor([indptr[b] + n + step for b, n in enumerate(lens)])
        out = lightning_decode(q[rows], k[rows], v[rows], case.slopes, states, slots,
                               config=DecodeConfig(block_v=16, block_k=16))
        close(out, want[rows], TOL[dtype])
        out_steps.append(out)
    close(states[slots.long()], torch.stack(finals), TOL[dtype])
    # and the same through one extend over all the tokens (the decode steps included)
    one_states = torch.full((5, H, D, D), float("nan"))
    one_states[slots.long()] = case.init.float()
    one = lightning_extend(q, k, v, torch.tensor(indptr, dtype=torch.int32), indptr,
                           case.prefixes, case.slopes, one_states, slots, config=config)
    for step in range(steps):
        rows = torch.tensor([indptr[b] + n + step for b, n in enumerate(lens)])
        close(one[rows], out_steps[step].double(), TOL[dtype])
    close(one_states[slots.long()], states[slots.long()].double(), TOL[dtype])
