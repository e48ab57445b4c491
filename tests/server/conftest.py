"""Real HTTP servers for tests, on a free loopback port.

Two ways, both usable as context managers from any test module:
- `running_server(*cli_args)`: `python -m server serve --port 0 ...` in a subprocess (the
  real CLI; needed for signals). Loads the model itself (tens of seconds on CPU).
- `inprocess_server(config, settings)`: the same app on uvicorn in a background thread,
  reusing the session's already-loaded SmolLM2 (engine_fixtures.smollm2), so a module can
  start a server with its own flags for the price of the KV-pool allocation.
Both yield a handle with `base_url`, `headers` (the API key, if any) and `stats()`
(GET /v1/engine/stats: EngineCore.stats() plus the HTTP side's request counts).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.api.app import build_app
from server.api.endpoint import ServerSettings
from server.api.uvicorn_server import ServerThread
from server.engine import EngineConfig
from tests.server.engine_fixtures import smollm2

REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"attnserve listening on (http://\S+)")


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class ServerHandle:
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)

    def stats(self) -> dict:
        r = httpx.get(f"{self.base_url}/v1/engine/stats", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def is_idle(self) -> bool:
        """No request in flight, none in the scheduler, and no KV page held by a request."""
        s = self.stats()
        e = s["engine"]
        return (s["num_active_requests"] == 0 and e.get("num_running") == 0
                and e.get("num_waiting") == 0 and e.get("num_pages_in_use") == 0)

    def wait_idle(self, timeout: float = 30.0) -> None:
        wait_for(self.is_idle, timeout, what="the engine to be idle with no page in use")


@dataclass
class ServerProcess(ServerHandle):
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    # /health answers seen while the model was loading: (status, error code)
    startup_health: list[tuple[int, str | None]] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


def _api_key_of(cli_args: tuple[str, ...]) -> str | None:
    args = list(cli_args)
    return args[args.index("--api-key") + 1] if "--api-key" in args else None


@contextlib.contextmanager
def running_server(*cli_args: str, startup_timeout: float = 300.0) -> Iterator[ServerProcess]:
    """Start `python -m server serve` on a free loopback port; stop it (SIGKILL if it hangs)
    on exit. Waits until /health answers 200."""
    log = tempfile.NamedTemporaryFile(prefix="attnserve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", "0",
           *cli_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    handle = ServerProcess(base_url="", proc=proc, log_path=Path(log.name))
    key = _api_key_of(cli_args)
    if key:
        handle.headers = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + startup_timeout
        while not handle.base_url:
            match = _LISTENING.search(handle.log())
            if match:
                handle.base_url = match.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{handle.log()[-4000:]}")
            else:
                time.sleep(0.1)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{handle.log()[-4000:]}")
            try:
                r = httpx.get(f"{handle.base_url}/health", timeout=5)
            except httpx.TransportError:
                return False
            code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
            handle.startup_health.append((r.status_code, code))
            return r.status_code == 200

        wait_for(healthy, max(1.0, deadline - time.monotonic()), 0.2, "/health to answer 200")
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
        os.unlink(log.name)


@dataclass
class InProcessServer(ServerHandle):
    thread: ServerThread | None = None


@contextlib.contextmanager
def inprocess_server(config: EngineConfig | None = None,
                     settings: ServerSettings | None = None) -> Iterator[InProcessServer]:
    """The app on uvicorn in a thread, on the session's shared SmolLM2 weights."""
    config = config or EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=4096)
    settings = settings or ServerSettings()
    # A short drain at teardown: a test that failed mid-request must not stall the module.
    thread = ServerThread(build_app(config, settings, loaded=smollm2()),
                          shutdown_timeout=5.0).start()
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        yield InProcessServer(base_url=thread.base_url, headers=headers, thread=thread)
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[InProcessServer]:
    """One in-process server with default flags (4096 KV tokens) for a whole test module."""
    with inprocess_server() as server:
        yield server
