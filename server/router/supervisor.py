"""`attnserve router`: N attnserve workers on loopback ports and SGLang's router in front.

Start-up: every worker is started at once (`attnserve serve --port 0`, each its own process
and engine, replica `replica-I`, on a GPU machine GPU I through CUDA_VISIBLE_DEVICES), and
once all answer GET /health with 200 the router is started with their URLs (and any
`--worker-url` running elsewhere), then waited for until GET /readiness says its workers
are healthy. Only then is the one URL printed.

Stop (SIGTERM or SIGINT): the router first (it finishes the requests it holds), then every
worker (each drains). A worker that exits on its own is logged and left out: the router's
health check takes it out of the pool within seconds (docs/replicas.md); the set ends, with
status 1, when the router exits or no worker is left.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from server.router.processes import Child, ChildFailed, wait_http_ok

logger = logging.getLogger(__name__)
ROUTER_GRACE_S = 25  # the router's own shutdown grace; stop() waits 5 s more, then kills it


@dataclass
class RouterSettings:
    """How the router is started (server/router/cli.py fills it from the flags)."""

    command: list[str]  # the router's launcher, e.g. python -m sglang_router.launch_router
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "cache_aware"
    metrics_port: int = 0  # the router's own Prometheus exposition; 0: a free port
    health_check_interval_s: int = 1
    health_failure_threshold: int = 2
    extra_args: list[str] = field(default_factory=list)

    def argv(self, worker_urls: list[str], metrics_port: int) -> list[str]:
        return [
            *self.command, "--host", self.host, "--port", str(self.port),
            "--worker-urls", *worker_urls, "--policy", self.policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--health-check-interval-secs", str(self.health_check_interval_s),
            "--health-failure-threshold", str(self.health_failure_threshold),
            "--health-success-threshold", "1",
            # a request routed to a worker that just died is retried until the health
            # checks (interval x threshold) have taken that worker out of the pool
            "--retry-max-retries", "8", "--retry-max-backoff-ms", "1000",
            # in-flight requests get this long at a stop, within ReplicaSet.stop's wait
            "--shutdown-grace-period-secs", str(ROUTER_GRACE_S),
            *self.extra_args,
        ]


def gpu_assignment(num_replicas: int, device_flag: str | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica: GPU i for replica i (wrapping around when there
    are more replicas than GPUs), None on a machine without one or with --device cpu."""
    if device_flag is not None and device_flag.startswith("cpu"):
        return [None] * num_replicas
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:
        import torch  # only here: a CPU-only run never needs it

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        return [None] * num_replicas
    if num_replicas > len(ids):
        logger.warning("%d replicas on %d GPUs: some GPUs hold several replicas",
                       num_replicas, len(ids))
    return [ids[i % len(ids)] for i in range(num_replicas)]


@dataclass
class ReplicaSet:
    worker_command: list[str]  # `attnserve serve` with the user's serve flags
    num_replicas: int
    router: RouterSettings
    external_urls: list[str] = field(default_factory=list)
    gpus: list[str | None] = field(default_factory=list)
    startup_timeout_s: float = 600.0
    worker_stop_timeout_s: float = 60.0
    workers: list[Child] = field(default_factory=list)
    router_child: Child | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        host = f"[{self.router.host}]" if ":" in self.router.host else self.router.host
        return f"http://{host}:{self.router.port}"

    def start(self) -> None:
        for i in range(self.num_replicas):
            name = f"replica-{i}"
            gpu = self.gpus[i] if i < len(self.gpus) else None
            env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
            child = Child(name, [*self.worker_command, "--host", "127.0.0.1", "--port", "0",
                                 "--replica-name", name], env)
            self.workers.append(child)
            child.start()
        for child in self.workers:
            url = child.wait_listening(self.startup_timeout_s, self._stop)
            wait_http_ok(child, url + "/health", self.startup_timeout_s, "healthy", self._stop)
            gpu = child.env.get("CUDA_VISIBLE_DEVICES")
            logger.info("%s ready at %s (pid %d%s)", child.name, url, child.pid,
                        f", GPU {gpu}" if gpu is not None else "")
        urls = [c.url for c in self.workers if c.url] + self.external_urls
        metrics_port = self.router.metrics_port or _free_port()
        self.router_child = Child("router", self.router.argv(urls, metrics_port))
        self.router_child.start()
        wait_http_ok(self.router_child, self.url + "/readiness", self.startup_timeout_s,
                     "ready", self._stop)
        print(f"attnserve router listening on {self.url} ({len(urls)} workers, policy "
              f"{self.router.policy}; router metrics on http://127.0.0.1:{metrics_port}/metrics)",
              flush=True)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until a signal (0) or until the router or every worker is gone (1)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        try:
            self.start()
        except ChildFailed as e:
            interrupted = self._stop.is_set()
            (logger.info if interrupted else logger.error)("%s", e)
            self.stop()
            return 0 if interrupted else 1
        status = self._watch()
        self.stop()
        return status

    def _watch(self) -> int:
        gone: set[str] = set()
        while not self._stop.wait(0.5):
            assert self.router_child is not None
            code = self.router_child.exit_code()
            if code is not None:
                logger.error("the router exited with status %s; stopping the workers", code)
                return 1
            for child in self.workers:
                code = child.exit_code()
                if code is not None and child.name not in gone:
                    gone.add(child.name)
                    logger.warning("%s (%s) exited with status %s; the router's health check "
                                   "takes it out of the pool", child.name, child.url, code)
            if self.workers and len(gone) == len(self.workers) and not self.external_urls:
                logger.error("every worker has exited")
                return 1
        logger.info("stopping: the router first, then %d workers", len(self.workers))
        return 0

    def stop(self) -> None:
        if self.router_child is not None:
            self.router_child.stop(timeout=ROUTER_GRACE_S + 5)
        threads = [threading.Thread(target=c.stop, args=(self.worker_stop_timeout_s,))
                   for c in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sys.stdout.flush()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
