"""Launch configurations (block sizes, warps, pipeline depth) of the extend kernel.

One fixed table per head dim and GPU generation, chosen from the sweep that
`attention/benchmarks/prefill.py` runs on the device (bench/results/*prefill*.json), so a
serving step never autotunes or waits on compilation once the first step has compiled the
kernel. `set_extend_config` overrides an entry (the benchmark's sweep uses it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int
    # Look up a page id per key even when a tile lies inside one page (a vector load that the
    # software pipeliner can issue ahead, instead of one scalar load per tile).
    per_row_pages: bool = False

    def __str__(self) -> str:
        rows = "r" if self.per_row_pages else ""
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{rows}"


# (compute capability major, head dim bucket) -> config. Head dims are bucketed to the
# power of two the kernel pads them to. Hopper (9) entries come from the H100 sweep.
_TABLE: dict[tuple[int, int], ExtendConfig] = {
    (9, 64): ExtendConfig(128, 64, 4, 3),
    (9, 128): ExtendConfig(128, 64, 8, 3),
    (9, 256): ExtendConfig(64, 32, 4, 2),
    (8, 64): ExtendConfig(128, 64, 4, 3),
    (8, 128): ExtendConfig(128, 32, 4, 3),
    (8, 256): ExtendConfig(64, 32, 4, 2),
}
_FALLBACK = ExtendConfig(64, 32, 4, 2)
# Small tiles for the CPU interpreter: cheap to emulate, and they exercise multi-tile loops.
INTERPRETER_CONFIG = ExtendConfig(16, 16, 4, 1)

_overrides: dict[tuple[int, int], ExtendConfig] = {}


def head_dim_bucket(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def extend_config(head_dim: int, capability_major: int | None) -> ExtendConfig:
    """The config for a head dim on a device generation (None: the CPU interpreter)."""
    if capability_major is None:
        return INTERPRETER_CONFIG
    key = (capability_major, head_dim_bucket(head_dim))
    if key in _overrides:
        return _overrides[key]
    major = capability_major if (capability_major, key[1]) in _TABLE else min(capability_major, 9)
    return _TABLE.get((major, key[1]), _FALLBACK)


def set_extend_config(head_dim: int, capability_major: int, config: ExtendConfig | None) -> None:
    """Override (or with None, restore) the config for a head dim on a device generation."""
    key = (capability_major, head_dim_bucket(head_dim))
    if config is None:
        _overrides.pop(key, None)
    else:
        _overrides[key] = config
