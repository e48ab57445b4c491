"""Launch configurations (block sizes, warps, pipeline depth) of the extend kernel.

A fixed table per GPU generation, head dim and layout kind (paged nhd/hnd, the page-size-1
`token` layout, hnd_x), chosen from the sweep that `bench/attention/prefill.py` runs
on the device (bench/results/*prefill*.json). No autotuning happens in a serving step: the
backend compiles its one config at warm-up, so no later step waits on compilation.
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
    # Read unmasked nhd/hnd tiles with bulk tensor copies (TMA) when a tile fits in a page.
    tma: bool = False
    tma_diag: bool = False  # with tma: the masked (diagonal) tiles through TMA too
    # On Hopper, serve the calls it supports (softmax, nhd/hnd, pages of >= 64 keys) with the
    # Gluon kernel of extend_sm90.py; the fields above then configure only the fallback.
    hopper: bool = False

    def __str__(self) -> str:
        flags = ("r" if self.per_row_pages else "") + ("t" if self.tma else "")
        flags += ("d" if self.tma_diag else "") + ("h" if self.hopper else "")
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{flags}"


# (capability major, head dim bucket, layout kind) -> config. The `tma` flag only takes
# effect where a tile fits in a page (nhd/hnd, page_size % block_n == 0). Hopper rows: the
# H100 and H200 runs in docs/kernels.md ("Launch choices").
_TABLE: dict[tuple[int, int, str], ExtendConfig] = {
    # nhd/hnd: the Gluon kernel (extend_sm90.py) where it applies; this Triton config serves
    # the rest (other variants, small pages)
    (9, 128, "paged"): ExtendConfig(128, 64, 4, 3, tma=True, tma_diag=True, hopper=True),
    (9, 128, "token"): ExtendConfig(128, 64, 4, 3),
    (9, 128, "hnd_x"): ExtendConfig(128, 64, 4, 3),
    (9, 64, "paged"): ExtendConfig(128, 64, 4, 3, tma=True, tma_diag=True),
    (9, 64, "token"): ExtendConfig(128, 64, 4, 3),
    (9, 64, "hnd_x"): ExtendConfig(128, 64, 4, 3),
}
_GENERIC = {  # other GPUs and head dims: tiles that fit ~100 KB of shared memory
    16: ExtendConfig(64, 64, 4, 2), 32: ExtendConfig(64, 64, 4, 2),
    64: ExtendConfig(64, 64, 4, 2), 128: ExtendConfig(64, 32, 4, 2),
    256: ExtendConfig(32, 32, 4, 2),
}
_FALLBACK = ExtendConfig(16, 16, 4, 1)
# Small tiles for the CPU interpreter: cheap to emulate, and they exercise multi-tile loops.
INTERPRETER_CONFIG = ExtendConfig(16, 16, 4, 1)


def head_dim_bucket(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def layout_kind(layout_name: str) -> str:
    """token (page size 1), hnd_x (its own load path) or paged (nhd, hnd)."""
    return layout_name if layout_name in ("token", "hnd_x") else "paged"


def extend_config(head_dim: int, capability_major: int | None,
                  layout_name: str = "nhd") -> ExtendConfig:
    """The config for a head dim on a device generation (None: the CPU interpreter)."""
    if capability_major is None:
        return INTERPRETER_CONFIG
    bucket = head_dim_bucket(head_dim)
    key = (capability_major, bucket, layout_kind(layout_name))
    if key in _TABLE:
        return _TABLE[key]
    return _GENERIC.get(bucket, _FALLBACK)
