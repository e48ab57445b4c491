"""Start an attnserve server on a free loopback port, wait for /health, stop it."""

from __future__ import annotations

import logging
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

logger = logging.getLogger(__name__)


def default_server_command() -> list[str]:
    return [sys.executable, "-m", "server", "serve"]


def free_loopback_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    """A server subprocess whose output goes to ``log_path``; use as a context manager."""

    args: list[str]
    log_path: Path
    host: str = "127.0.0.1"
    command: list[str] = field(default_factory=default_server_command)
    startup_timeout_s: float = 300.0
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def full_command(self) -> list[str]:
        return [*self.command, "--host", self.host, "--port", str(self.port), *self.args]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> None:
        self.port = self.port or free_loopback_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.full_command()
        logger.info("starting server: %s", shlex.join(cmd))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    raise ServerStartError(
                        f"server exited with code {code} before it was healthy; "
                        f"log {self.log_path}:\n{self.log_tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        logger.info("server healthy at %s", self.base_url)
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"server not healthy after {self.startup_timeout_s:.0f} s; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("server did not stop in %.0f s; killing it", grace_s)
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
