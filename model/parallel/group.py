"""A rank's tensor-parallel group: its rank, the group size, and the collectives the model
runs (all-reduce, all-gather along the vocabulary, broadcast of rank 0's tokens).

One group per process (torch.distributed's default group): gloo when the ranks run on the
CPU, NCCL on GPUs. Every collective waits at most `timeout_s` for a peer (the process
group's timeout), so a rank that stops answering ends in an error rather than a hang; a rank
whose process dies is caught sooner by the server's watchdog (server/engine/tensor_parallel.py).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Longest wait of one collective for a peer. A dead rank is reported by the watchdog within
# a second; this bounds the wait on a rank that is alive but stuck.
COLLECTIVE_TIMEOUT_S = 120.0


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: torch.device,
             timeout_s: float = COLLECTIVE_TIMEOUT_S) -> TPGroup:
        """Join the group at 127.0.0.1:`port` (blocks until all `size` ranks joined)."""
        if dist.is_initialized():
            raise RuntimeError("this process is already in a torch.distributed group: one "
                               "tensor-parallel engine per process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # On a failed or timed-out collective, NCCL's watchdog aborts the communicator
            # and leaves the process alive (torch's default kills it): the server reports
            # the failure on /health and to its requests (server/engine/tensor_parallel.py).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        logger.info("tensor-parallel rank %d/%d joined (%s on %s)", rank, size, backend, device)
        return cls(rank, size, device)

    def leave(self) -> None:
        """Destroy the process group (after a clean stop; a broken group is left alone)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def abort(self) -> None:
        """Abort the group's pending collectives (a peer died): a thread waiting in one
        gets an error instead of waiting for the timeout. Best effort: torch's abort is
        private and NCCL-only."""
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception:  # not available for this backend or torch version
            logger.debug("process group abort not available", exc_info=True)

    # ---- collectives (every rank calls them in the same order) ---------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank r's part at columns r*n:(r+1)*n."""
        x = x.contiguous()
        if x.device.type == "cuda":
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x)
            parts = list(out.unbind(0))
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` into every rank's `x` (in place)."""
        dist.broadcast(x, src)
        return x
