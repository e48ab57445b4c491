"""`--tensor-parallel-size N`: the server process is rank 0 and starts ranks 1..N-1 itself.

Rank 0 (this process) holds the scheduler, the radix cache, the page allocator and the HTTP
side, and its own shard of the model and of the KV pool; it spawns one worker process per
other rank (torch.multiprocessing, spawn), and each builds its shard of the model, of the KV
pool (the same number of pages: the smallest any rank can hold) and its attention backend,
then runs what rank 0 sends (model/parallel/runner.py). Device rank r is `cuda:r` on GPUs.

A rank that dies fails the server loudly: a watchdog thread waits on the workers' process
sentinels and, within milliseconds of one ending, reports the failure (the server marks its
engine broken: /health answers 503 and every in-flight request ends with an error), kills
the other workers (they would wait in a collective) and aborts rank 0's pending collectives
where the backend allows (NCCL). Collectives time out after COLLECTIVE_TIMEOUT_S in any case.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from attention.base import AttentionBackend
from attention.registry import build_attention_backend
from attention.variants import parse_variant
from kvcache.cache_spec import CacheSpec, pages_within_memory, uniform_spec
from kvcache.kv_dtype import KVCacheDtype
from model.decode_gemm import use_decode_gemm
from model.families import attention_config_for
from model.loader import load_model, peek_model_config
from model.parallel.channel import StepChannel, TensorParallelError, receive
from model.parallel.group import TPGroup, free_loopback_port
from model.parallel.runner import FollowerRunner, LeaderRunner
from model.parallel.sharding import check_splittable
from server.engine.config import EngineConfig

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # a worker's time to leave after "stop", then it is killed
DEATH_GRACE_S = 1.0  # a failed collective waits this long for a rank's exit to name it


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def tensor_parallel_problem(config: EngineConfig) -> str | None:
    """Why `config` cannot run at its tensor-parallel size, found before anything loads
    (a one-line message), or None."""
    size = config.tensor_parallel_size
    if size < 1:
        return f"--tensor-parallel-size must be at least 1, got {size}"
    if size == 1:
        return None
    device = config.resolved_device()
    if device.type == "cuda":
        if device.index not in (None, 0):
            return (f"--device {config.device} with --tensor-parallel-size {size}: the ranks use "
                    f"cuda:0..{size - 1}; choose the GPUs with CUDA_VISIBLE_DEVICES")
        if torch.cuda.device_count() < size:
            return (f"--tensor-parallel-size {size} needs {size} GPUs; "
                    f"{torch.cuda.device_count()} are visible")
    elif device.type != "cpu":
        return f"--tensor-parallel-size {size}: device {device} is neither cpu nor cuda"
    if parse_variant(config.attention_variant).name == "alibi":
        return ("--attention-variant alibi with --tensor-parallel-size > 1: ALiBi slopes follow "
                "the global head index, which a rank's backend does not know")
    try:
        check_splittable(peek_model_config(config.model), size)
    except ValueError as e:
        return str(e)
    return None


def _wait_for(rank: int, conn: Connection, proc: BaseProcess, kind: str) -> tuple[Any, ...]:
    """Worker `rank`'s next message, which must be `kind`; TensorParallelError if it reports
    an error or exits first."""
    while True:
        ready = multiprocessing.connection.wait([conn, proc.sentinel])
        if conn in ready:
            try:
                message = receive(conn)
            except EOFError:
                message = None
            if message is not None and message[0] == "error":
                raise TensorParallelError(f"tensor-parallel rank {rank} failed to start:\n"
                                          f"{message[1]}")
            if message is not None and message[0] == kind:
                return message
            if message is not None:
                raise TensorParallelError(f"rank {rank} sent {message[0]!r}, not {kind!r}")
        proc.join(1.0)
        if not proc.is_alive():
            raise TensorParallelError(f"tensor-parallel rank {rank} exited with code "
                                      f"{proc.exitcode} while starting")


class TensorParallel:
    """Rank 0's side of the group: the workers, the channel to them, the watchdog."""

    def __init__(self, config: EngineConfig) -> None:
        problem = tensor_parallel_problem(config)
        if problem is not None:
            raise ValueError(problem)
        self.size = config.tensor_parallel_size
        device = config.resolved_device()
        if device.type == "cuda":  # rank 0 is cuda:0 ("cuda" names no device for NCCL)
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
        self._saved_threads = torch.get_num_threads()
        if device.type == "cpu":  # the ranks share the cores (restored at shutdown)
            torch.set_num_threads(cpu_threads_per_rank(self.size))
        self.failure: str | None = None
        self._on_failure: Callable[[str], None] | None = None
        self._stopping = False
        self._lock = threading.Lock()
        ctx = torch.multiprocessing.get_context("spawn")
        port = free_loopback_port()
        self.processes: list[BaseProcess] = []
        connections: list[Connection] = []
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, name=f"attnserve-tp{rank}", daemon=True,
                               args=(_worker_config(config, rank), rank, self.size, port,
                                     theirs, level))
            proc.start()
            theirs.close()
            self.processes.append(proc)
            connections.append(ours)
        self.channel = StepChannel(connections)
        try:
            for rank, (conn, proc) in enumerate(zip(connections, self.processes, strict=True),
                                                start=1):
                _, pid, dev = _wait_for(rank, conn, proc, "spawned")
                logger.info("tensor-parallel rank %d: pid %d on %s", rank, pid, dev)
            self.group = TPGroup.join(0, self.size, port, device)
        except BaseException:
            self._kill_workers()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()

    # ---- start-up ---------------------------------------------------------------------
    def agree_on_pages(self, num_pages: int) -> int:
        """The KV pool's page count on every rank: the smallest any rank can hold (each
        measured its own free memory under --gpu-memory-utilization), sent to them all."""
        candidates = [num_pages]
        for rank, (conn, proc) in enumerate(zip(self.channel.connections, self.processes,
                                                strict=True), start=1):
            _, pages = _wait_for(rank, conn, proc, "loaded")
            if pages is not None:
                candidates.append(pages)
        agreed = min(candidates)
        self.channel.send(("pages", agreed))
        if agreed < num_pages:
            logger.info("KV pool: %d pages on every rank (rank 0 could hold %d)", agreed,
                        num_pages)
        return agreed

    def make_runner(self, model: torch.nn.Module, backend: AttentionBackend,
                    device: torch.device, page_size: int) -> LeaderRunner:
        runner = LeaderRunner(model, backend, device, page_size, self.group, self.channel)
        runner.on_failure = self.fail
        return runner

    # ---- failure ------------------------------------------------------------------------
    def set_failure_handler(self, handler: Callable[[str], None]) -> None:
        """`handler(reason)` is called once, from the watchdog's thread, when the group fails
        (at once if it already has)."""
        with self._lock:
            self._on_failure = handler
            failure = self.failure
        if failure is not None:
            handler(failure)

    def fail(self, reason: str) -> str:
        """The group cannot serve on: report it once, stop the workers, unblock rank 0. A
        collective that failed on rank 0 usually means a rank died: its exit is waited for
        briefly, so the report names it."""
        dead = self._dead_worker(DEATH_GRACE_S)
        if dead is not None and not reason.startswith("tensor-parallel rank"):
            reason = f"{dead} ({_first_line(reason)})"
        self._report(reason)
        return reason

    def _dead_worker(self, wait_s: float) -> str | None:
        """'tensor-parallel rank R (pid P) exited with code C' for the first worker that has
        exited or exits within `wait_s`, else None."""
        by_sentinel = {proc.sentinel: (rank, proc)
                       for rank, proc in enumerate(self.processes, start=1)}
        ready = multiprocessing.connection.wait(list(by_sentinel), timeout=wait_s)
        if not ready:
            return None
        rank, proc = by_sentinel[ready[0]]
        proc.join(1.0)
        return f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"

    def _report(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None or self._stopping:
                return
            self.failure = reason
            handler = self._on_failure
        logger.error("tensor parallelism failed: %s; the engine stops serving", reason)
        if handler is not None:  # first: the requests in flight get their error
            handler(reason)
        self._kill_workers()
        if self.group.device.type == "cuda":
            self.group.abort()

    def _watch(self) -> None:
        dead = self._dead_worker(wait_s=None)  # type: ignore[arg-type]  # until one exits
        if not self._stopping and dead is not None:
            self._report(dead)

    def _kill_workers(self) -> None:
        for proc in self.processes:
            if proc.is_alive():
                proc.kill()

    # ---- stop ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the workers (politely, then by force) and leave the group."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            failed = self.failure is not None
        if not failed:
            try:
                self.channel.send(("stop",), wait_s=1.0)
            except TensorParallelError:
                failed = True
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        for proc in self.processes:
            proc.join(1.0)
        self.channel.close()
        torch.set_num_threads(self._saved_threads)
        if not failed:
            self.group.leave()


def cpu_threads_per_rank(size: int) -> int:
    return max(1, (os.cpu_count() or 1) // size)


def _worker_config(config: EngineConfig, rank: int) -> EngineConfig:
    device = config.resolved_device()
    return dataclasses.replace(config, device=f"cuda:{rank}" if device.type == "cuda" else "cpu")


# ---- the worker process -------------------------------------------------------------------


def _exit_with_parent() -> None:
    """A worker whose parent (rank 0) died exits: nobody will send it work again."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def candidate_pages(config: EngineConfig, spec: CacheSpec, page_size: int, num_layers: int,
                    kv_dtype: KVCacheDtype, device: torch.device) -> int | None:
    """The pages this rank could hold when the pool is sized by free GPU memory (None when
    rank 0's size, in tokens or bytes, holds for every rank)."""
    size = config.kv_pool_size()
    if size.gpu_fraction is None:
        return None
    page_bytes = spec.stored_bytes_per_token(kv_dtype) * num_layers * page_size
    return pages_within_memory(page_bytes, device, size.gpu_fraction)


def worker_main(config: EngineConfig, rank: int, size: int, port: int, conn: Connection,
                log_level: int) -> None:
    """Rank `rank`'s process: join the group, load its shard, build its part of the KV pool
    and its backend, then run what rank 0 sends until it says stop."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [tp rank {rank}] "
                                                "%(name)s: %(message)s")
    # A worker is a daemon process, which may not start processes of its own: torch.compile
    # (the flex backend) compiles in this process rather than in a pool.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    try:
        device = config.resolved_device()
        if device.type == "cpu":  # the ranks share the cores
            torch.set_num_threads(cpu_threads_per_rank(size))
        conn.send(("spawned", os.getpid(), str(device)))
        group = TPGroup.join(rank, size, port, device)
        dtype = config.resolved_dtype()
        model = load_model(config.model, dtype, device, seed=config.seed, with_tokenizer=False,
                           tp=group).model
        use_decode_gemm(model, config.decode_gemm)
        local = model.config
        kv_dtype = config.resolved_kv_cache_dtype()
        spec = uniform_spec(local.layer_cache_specs())
        layout = spec.make_layout(config.kv_layout, config.page_size, kv_dtype.storage_name)
        conn.send(("loaded", candidate_pages(config, spec, layout.page_size, local.num_layers,
                                             kv_dtype, device)))
        _, num_pages = receive(conn)
        pool = spec.build_pool(layout, local.num_layers, num_pages, dtype, device, kv_dtype)
        attn = attention_config_for(local, parse_variant(config.attention_variant))
        backend = build_attention_backend(attn, pool, config.resolved_backend(spec.kind),
                                          config.prefill_backend, config.decode_backend)
        runner = FollowerRunner(model, backend, device, layout.page_size, group)
        logger.info("rank %d ready: %d pages of %d tokens", rank, num_pages, layout.page_size)
        with torch.inference_mode():
            runner.follow(conn)
    except BaseException:
        text = traceback.format_exc()
        logger.error("tensor-parallel rank %d failed:\n%s", rank, text)
        try:
            conn.send(("error", text))
        except OSError:  # rank 0 is gone already: nobody to tell
            pass
        logging.shutdown()
        os._exit(1)
    group.leave()
