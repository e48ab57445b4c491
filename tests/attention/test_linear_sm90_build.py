"""The lightning kernels build for sm_90 without a GPU (their numerics are checked under
the interpreter in test_linear_triton.py and on the device by the benchmark): the default
extend launch runs its dots on the warpgroup MMA with asynchronous copies feeding them and
spills at most a few hundred bytes (the default is the fastest config measured, which spills
a little: docs/kernels.md, "Lightning attention"), the decode kernel moves the state with
16-byte loads and stores and does not spill."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from attention.linear import DEFAULT_DECODE_CONFIG, DEFAULT_EXTEND_CONFIG

HOPPER_SMEM_PER_BLOCK = 227 * 1024


def _build(which: str, config: tuple[int, ...]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-m", "tests.attention.linear_build", which,
                           ",".join(map(str, config))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _no_spills(report: str | None, allowed_bytes: int = 0) -> None:
    if report is None:
        pytest.skip("no ptxas here accepts this Triton's PTX")
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) <= allowed_bytes, report


def test_extend_builds_on_warpgroup_mma():
    c = DEFAULT_EXTEND_CONFIG
    built = _build("extend", (c.chunk, c.block_v, c.num_warps, c.num_stages))
    assert built["ptx_has"]["wgmma.mma_async"] and built["ptx_has"]["cp.async"]
    assert built["shared"] <= HOPPER_SMEM_PER_BLOCK
    _no_spills(built["ptxas"], allowed_bytes=256)


def test_decode_builds_with_wide_state_accesses():
    c = DEFAULT_DECODE_CONFIG
    built = _build("decode", (c.block_v, c.block_k, c.num_warps))
    assert built["ptx_has"]["ld.global.v4"] and built["ptx_has"]["st.global.v4"]
    _no_spills(built["ptxas"])
