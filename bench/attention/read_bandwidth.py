"""Read-only memory bandwidth of the GPU: the ceiling of a kernel that only reads.

A decode kernel reads K/V and writes almost nothing, so it can run faster than a
device-to-device copy (which also writes and turns the bus around). This streaming sum
measures how fast this device reads, to tell a missed target from an impossible one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stream_sum_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in tl.range(0, ITERS, num_stages=4):
        acc += tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


# (BLOCK, ITERS, warps): the best of these on the H100 read 3165 GB/s (1.054x copy)
_CONFIGS = ((4096, 16, 8), (8192, 8, 8), (2048, 32, 4))


def measure_read_gbps(device: torch.device, nbytes: int = 1 << 31) -> float:
    """The best streaming-read rate (bytes read / s / 1e9) over a few launch shapes."""
    from bench.attention.common import time_cuda_us

    n = nbytes // 2
    x = torch.ones(n, device=device, dtype=torch.bfloat16)
    best = 0.0
    for block, iters, warps in _CONFIGS:
        grid = n // (block * iters)
        out = torch.empty(grid, device=device)
        t_us = time_cuda_us(
            lambda g=grid, o=out, b=block, it=iters, w=warps: _stream_sum_kernel[(g,)](
                x, o, BLOCK=b, ITERS=it, num_warps=w),
            warmup=3, iters=20,
        )
        expected = float(block * iters)
        if not torch.allclose(out[:4], torch.full_like(out[:4], expected)):
            raise RuntimeError("read-bandwidth kernel summed wrongly")
        best = max(best, grid * block * iters * 2 / (t_us * 1e-6) / 1e9)
    return best
