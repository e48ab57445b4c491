"""The Hopper (Gluon) extend kernel builds for sm_90 without a GPU.

CI has no Hopper GPU and Gluon kernels do not run under the CPU interpreter, so their
numerics are checked on the device (`attnserve bench attention --op prefill` runs the
ragged, NaN-poisoned checks through `extend_attention`, which dispatches there on sm_90).
What CI can check is that the kernel still compiles, for the layouts and head dims it
claims, down to machine code with Hopper's instructions: the asynchronous warpgroup MMA
with a wait that leaves one MMA in flight, bulk tensor copies, warp specialisation with
register reallocation between the consumers and the producer, mbarrier hand-offs between
them, and a CTA that fits the SM's shared memory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

sm90 = pytest.importorskip("attention.triton.extend_sm90")

from attention.variants import Variant  # noqa: E402
from kvcache.layout import KVLayout  # noqa: E402

HOPPER_SMEM_PER_BLOCK = 227 * 1024
_BUILD = """
import json, sys
from attention.triton.extend_sm90 import compile_offline
c = compile_offline(int(sys.argv[1]), sys.argv[2], page_size=int(sys.argv[3]))
print(json.dumps({"ptx": c.asm["ptx"], "cubin": len(c.asm.get("cubin") or b""),
                  "shared": c.metadata.shared}))
"""


def _build(head_dim: int, layout_name: str, page_size: int = 64) -> dict:
    # a fresh interpreter without TRITON_INTERPRET (conftest sets it for the Triton tests)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _BUILD, str(head_dim), layout_name, str(page_size)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# pages of 64 keys: two copies per 128-key tile; of 128: one
@pytest.mark.parametrize("head_dim,layout_name,page_size",
                         [(128, "nhd", 64), (128, "hnd", 64), (64, "nhd", 64), (128, "hnd", 128),
                          (128, "hnd_x", 64), (64, "hnd_x", 128)])
def test_builds_with_hopper_instructions(head_dim, layout_name, page_size):
    built = _build(head_dim, layout_name, page_size)
    ptx = built["ptx"]
    assert "wgmma.mma_async" in ptx  # q.K^T and P.V on the warpgroup MMA
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # waits that leave one MMA in flight
    assert "cp.async.bulk.tensor" in ptx  # q/K/V tiles by bulk tensor copies
    # the producer warp gives registers up, the consumer warpgroups take them
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx
    # ring slots released and ping-pong turns passed by mbarrier arrivals
    assert "mbarrier.arrive.shared" in ptx and "mbarrier.try_wait" in ptx
    assert built["cubin"] > 0
    assert built["shared"] <= HOPPER_SMEM_PER_BLOCK


def _ptxas_report(ptx: str) -> str | None:
    """ptxas -v on the PTX with an assembler Triton ships that accepts its PTX version."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in sorted(glob.glob(os.path.join(bin_dir, "ptxas*")), reverse=True):
            done = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", src + ".cubin"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                return done.stderr
    return None


def test_mmas_stay_asynchronous_without_spills():
    """ptxas serialises every warpgroup MMA of a kernel (warning C7514/C7515) when other
    instructions touch an accumulator while its MMA is in flight: the kernel would still be
    right but lose the overlap it exists for. And no register spills."""
    report = _ptxas_report(_build(128, "nhd")["ptx"])
    if report is None:
        pytest.skip("no ptxas here accepts this Triton's PTX")
    assert "C7514" not in report and "C7515" not in report, report
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report


def test_supports_only_what_it_implements():
    layout = KVLayout.create("nhd", 64, 8, 128, "torch.bfloat16")
    q = torch.empty(4, 32, 128, dtype=torch.bfloat16)  # a CPU tensor: never this kernel
    assert not sm90.supports(q, layout, Variant("softmax"))
