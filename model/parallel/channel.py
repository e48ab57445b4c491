"""Rank 0's messages to the other ranks: one pipe per rank, one pickle per message.

The step's host inputs (token ids, lengths, page tables, which rows are sampled) go over
pipes rather than a collective: a follower waits for the next step without a timeout (an
idle server may send nothing for hours, while a collective would time out), and a rank whose
process died shows at once, as a broken pipe on rank 0's side and as the end of the pipe on
a follower's. The message is pickled once and its bytes written to every pipe.
"""

from __future__ import annotations

import pickle
import threading
from multiprocessing.connection import Connection
from typing import Any


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot go on: a rank died or fell out of step."""


class StepChannel:
    """Rank 0's end: `send` the same message to ranks 1..N-1."""

    def __init__(self, connections: list[Connection]) -> None:
        self.connections = connections  # connections[i] leads to rank i + 1
        # one message at a time on every pipe, whichever thread sends (the engine thread
        # sends steps; a shutdown may come from another)
        self._lock = threading.Lock()

    def send(self, message: Any, wait_s: float = -1) -> None:
        """Send `message` to every rank; TensorParallelError if one is gone, or if another
        thread's message holds the pipes for more than `wait_s` seconds (-1: no limit)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._lock.acquire(timeout=wait_s):
            raise TensorParallelError("the step channel is busy (a send is stuck)")
        try:
            for rank, conn in enumerate(self.connections, start=1):
                try:
                    conn.send_bytes(payload)
                except (OSError, ValueError) as e:  # broken pipe, closed connection
                    raise TensorParallelError(f"tensor-parallel rank {rank} is gone "
                                              f"({e})") from e
        finally:
            self._lock.release()

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


def receive(conn: Connection) -> Any:
    """A follower's next message; EOFError when rank 0 is gone."""
    return pickle.loads(conn.recv_bytes())
