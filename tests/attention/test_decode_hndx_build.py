"""The Gluon hnd_x decode kernel builds for NVIDIA targets without a GPU, and its split
heuristic and dispatch rules.

Gluon kernels do not run under the CPU interpreter, so the kernel's numerics are checked on
the device: `attnserve bench attention --op decode --check` runs every variant on ragged,
NaN-poisoned batches through `decode_attention` (bench/attention/decode_checks.py),
which dispatches hnd_x there. What CI checks is the property the kernel exists for: K/V go
from global memory straight into mma operand registers in 16-byte loads, with no shared
memory at all (the portable kernel's transpose through shared memory is what it replaces).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

hx = pytest.importorskip("attention.triton.decode_hndx")

from attention.triton.decode import DecodeConfig, default_decode_config  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402

_BUILD = """
import json, sys
from attention.triton.decode_hndx import compile_offline
out = []
for spec in sys.argv[1:]:
    head_dim, page, group, direct, variant, arch = spec.split(",")
    c = compile_offline(int(head_dim), int(page), int(group), direct == "1", variant, int(arch))
    out.append({"spec": spec, "ptx": c.asm["ptx"], "shared": c.metadata.shared})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def builds() -> dict[str, dict]:
    specs = ["128,16,4,1,softmax,90", "128,64,4,0,softmax,90", "64,16,3,1,softmax,90",
             "128,16,16,0,alibi,90", "128,16,4,0,silu,90", "128,16,4,1,softcap,80"]
    # a fresh interpreter without TRITON_INTERPRET (conftest sets it for the Triton tests)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _BUILD, *specs], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {b["spec"]: b for b in json.loads(done.stdout.strip().splitlines()[-1])}


def test_kv_goes_to_registers_without_shared_memory(builds):
    for spec, built in builds.items():
        ptx = built["ptx"]
        head_dim = int(spec.split(",")[0])
        assert built["shared"] == 0, spec  # no staging, no transpose through shared memory
        assert "st.shared" not in ptx and "ld.shared" not in ptx, spec
        # per 64-token tile: K and V, head_dim x 64 x 2 bytes each, 16 bytes a thread a load
        assert len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)) == 2 * head_dim * 64 * 2 // 16 // 32, spec
        # S^T = K.q^T and O^T = V^T.P^T on m16n8k16: (64/16) x (D/16) + (D/16) x (64/16)
        mmas = len(re.findall(r"mma\.sync\.aligned\.m16n8k16", ptx))
        assert mmas == 2 * (64 // 16) * (head_dim // 16) * (2 if "16,0,alibi" in spec else 1), spec


def test_supports_and_dispatch_rules():
    layout = KVLayout.create("hnd_x", 16, 8, 128, "torch.bfloat16")
    q = torch.empty(4, 32, 128, dtype=torch.bfloat16)  # a CPU tensor: never this kernel
    assert not hx.supports(q, torch.empty(1, dtype=torch.bfloat16), layout)
    # the CPU interpreter configuration never selects it
    assert not default_decode_config(layout, 128, on_gpu=False).gluon_hndx


def test_split_choice_fits_one_wave_of_one_warp_programs():
    # H200 (132 SMs) measurements behind these: bench/results/h200-decode-hndx-registers-ab-2026-12-02.json
    assert hx.choose_num_splits(64, 8, 4096, 132, max_splits=128) == 2
    assert hx.choose_num_splits(16, 8, 16384, 132, max_splits=128) == 8
    assert hx.choose_num_splits(256, 8, 1024, 132, max_splits=128) == 1
    assert hx.choose_num_splits(1, 8, 32768, 132, max_splits=128) == 128
    assert hx.choose_num_splits(1, 8, 300, 132, max_splits=128) == 2  # >= 256 tokens a split
    gluon = DecodeConfig(64, 1, 1, gluon_hndx=True, max_splits=128)
    triton = DecodeConfig(64, 4, 2)
    assert gluon.num_splits(16, 8, 16384, 132) == 8
    assert triton.num_splits(16, 8, 16384, 132) == 5
