"""State slots for linear-attention layers: which slots are free and who owns each.

A slot holds one request's recurrent state for every linear layer (kvcache/state_pool.py).
Owners are running requests (one slot each, from admission to finish, abort or preemption)
and the prefix cache's state snapshots. Slot 0 is scratch (padded rows of a CUDA graph
write there) and is never handed out. Pure Python: no torch.
"""

from __future__ import annotations

SCRATCH_SLOT = 0


class OutOfStateSlots(RuntimeError):
    """Raised by `StateSlotAllocator.alloc` when no slot is free."""


class StateSlotAllocator:
    """O(1) alloc/free over a stack of free slot ids; a slot has at most one owner."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 2:
            raise ValueError("the state pool needs at least 2 slots (slot 0 is scratch)")
        self.num_slots = num_slots  # including the scratch slot
        self._free = list(range(num_slots - 1, 0, -1))
        self._used = [False] * num_slots

    @property
    def num_total(self) -> int:
        return self.num_slots - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise OutOfStateSlots("no free state slot")
        slot = self._free.pop()
        self._used[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if slot == SCRATCH_SLOT or not self._used[slot]:
            raise ValueError(f"free of state slot {slot}, which is not in use")
        self._used[slot] = False
        self._free.append(slot)

    def is_used(self, slot: int) -> bool:
        return self._used[slot]

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "free list holds duplicates"
        assert SCRATCH_SLOT not in free and not self._used[SCRATCH_SLOT], "scratch slot handed out"
        for slot in range(1, self.num_slots):
            assert self._used[slot] != (slot in free), f"slot {slot}: used flag and free list disagree"
