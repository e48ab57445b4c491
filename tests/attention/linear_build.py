"""Build the lightning kernels for sm_90a without a GPU and print what ptxas reports, as
JSON: `python -m tests.attention.linear_build extend|decode CONFIG`. Run in a process
without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).

Pointer and stride arguments are marked divisible by 16, as the JIT specialises them at a
real launch: without that the compiler cannot vectorise the loads."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attention.linear.decode import _lightning_decode_kernel
from attention.linear.extend import _lightning_extend_kernel

HEAD_DIM = 128


def _source(kernel, pointers: dict[str, str], ints: list[str], constants: dict) -> ASTSource:
    signature = dict(pointers) | {name: "i32" for name in ints}
    aligned = [i for i, name in enumerate(signature)
               if name in pointers or name.startswith("stride")]
    signature |= {name: "constexpr" for name in constants}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return ASTSource(kernel, signature, constexprs=constants, attrs=attrs)


def build_extend(chunk: int, block_v: int, num_warps: int, num_stages: int,
                 snapshots: bool = True):
    pointers = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    pointers |= {"qo_indptr_ptr": "*i32", "prefix_ptr": "*i32", "slopes_ptr": "*fp32",
                 "states_ptr": "*fp32", "state_slots_ptr": "*i32", "snap_slots_ptr": "*i32"}
    ints = ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_ot", "stride_oh", "stride_slot", "stride_head", "snap_cols",
            "snapshot_every"]
    constants = dict(D=HEAD_DIM, CHUNK=chunk, BLOCK_V=block_v, HAS_SNAPSHOTS=snapshots,
                     DOT_PRECISION="tf32", UPCAST_DOTS=False, NUM_STAGES=num_stages)
    return triton.compile(_source(_lightning_extend_kernel, pointers, ints, constants),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def build_decode(block_v: int, block_k: int, num_warps: int):
    pointers = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    pointers |= {"slopes_ptr": "*fp32", "states_ptr": "*fp32", "state_slots_ptr": "*i32"}
    ints = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb", "stride_vh",
            "stride_ob", "stride_oh", "stride_slot", "stride_head"]
    constants = dict(D=HEAD_DIM, BLOCK_V=block_v, BLOCK_K=block_k)
    return triton.compile(_source(_lightning_decode_kernel, pointers, ints, constants),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_report(ptx: str) -> str | None:
    """ptxas -v with an assembler Triton ships that accepts its PTX (None: none does)."""
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


if __name__ == "__main__":
    which, config = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
    built = build_extend(*config) if which == "extend" else build_decode(*config)
    ptx = built.asm["ptx"]
    print(json.dumps({"ptx_has": {s: s in ptx for s in ("wgmma.mma_async", "cp.async",
                                                        "ld.global.v4", "st.global.v4")},
                      "shared": built.metadata.shared, "ptxas": ptxas_report(ptx)}))
