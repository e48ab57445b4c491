"""The linear-attention state pool: resets zero some slots and copy others in every layer,
leaving the rest untouched; the slot allocator hands out each slot once."""

from __future__ import annotations

import pytest
import torch

from kvcache.cache_spec import LinearStateSpec
from kvcache.state_pool import StatePool
from kvcache.state_slots import OutOfStateSlots, StateSlotAllocator


def test_reset_zeroes_and_copies_slots_in_every_layer() -> None:
    pool = StatePool(LinearStateSpec(num_heads=2, head_dim=4), num_layers=3, num_slots=7,
                     device=torch.device("cpu"))
    pool.states.copy_(torch.randn_like(pool.states))
    pool.states[:, 6] = float("nan")  # a slot a reset never reads: must not leak in
    before = pool.states.clone()
    # zeros for two new requests, two restores from snapshots (never the same slots)
    pool.reset(torch.tensor([1, 4]), torch.tensor([2, 3]), torch.tensor([5, 0]))
    assert (pool.states[:, [1, 4]] == 0).all()
    assert torch.equal(pool.states[:, 2], before[:, 5])
    assert torch.equal(pool.states[:, 3], before[:, 0])
    assert torch.equal(pool.states[:, [0, 5]], before[:, [0, 5]])
    assert pool.states[:, 6].isnan().all()
    empty = torch.tensor([], dtype=torch.int64)
    pool.reset(empty, empty, empty)
    assert pool.nbytes == 3 * 7 * 2 * 4 * 4 * 4


def test_slot_allocator_never_hands_out_scratch_or_twice() -> None:
    slots = StateSlotAllocator(4)
    taken = {slots.alloc() for _ in range(3)}
    assert taken == {1, 2, 3} and slots.num_free == 0
    with pytest.raises(OutOfStateSlots):
        slots.alloc()
    slots.free(2)
    with pytest.raises(ValueError):
        slots.free(2)
    with pytest.raises(ValueError):
        slots.free(0)
    assert slots.alloc() == 2
    slots.check_invariants()
