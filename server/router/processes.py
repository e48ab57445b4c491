"""Child processes of `attnserve router`: a worker or the router, its output prefixed and
forwarded, stopped by signal with a deadline."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger(__name__)
LISTENING = "attnserve listening on "  # the line `attnserve serve` prints once it is bound
# A worker's access-log line for one of the router's health probes (each worker, every
# second): not forwarded; a failing probe (503) still is.
HEALTH_PROBE_LINE = " GET /health 200 "


@dataclass
class Child:
    """One child process; its output goes to our stdout, each line prefixed `[name] `."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    url: str | None = None  # known once the child says where it listens
    _listening: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        logger.info("%s: %s", self.name, shlex.join(self.command))
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL, env={**os.environ, **self.env}, bufsize=1,
            start_new_session=True)  # a terminal's Ctrl-C reaches us only; we stop the children
        threading.Thread(target=self._forward, name=f"out-{self.name}", daemon=True).start()

    def _forward(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if self.url is None and line.startswith(LISTENING):
                self.url = line[len(LISTENING):].strip()
                self._listening.set()
            if HEALTH_PROBE_LINE in line:
                continue
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()
        self._listening.set()  # the output ended: nobody waits for a line that cannot come

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_listening(self, timeout: float, stop: threading.Event) -> str:
        """The URL the child printed (`attnserve serve --port 0` picks a free port)."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.2):
            if stop.is_set():
                raise ChildFailed(f"stopped while {self.name} was starting")
            if time.monotonic() > deadline:
                break
        if self.url is None:
            raise ChildFailed(f"{self.name} did not start listening (exit code "
                              f"{self.exit_code()})")
        return self.url

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            self.process.kill()
            return self.process.wait(10)


class ChildFailed(RuntimeError):
    pass


def wait_http_ok(child: Child, url: str, timeout: float, what: str,
                 stop: threading.Event) -> None:
    """Poll GET `url` until it answers 200; ChildFailed if the child exits, `stop` is set
    (a signal during start-up) or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if stop.is_set():
                raise ChildFailed(f"stopped while {child.name} was starting")
            code = child.exit_code()
            if code is not None:
                raise ChildFailed(f"{child.name} exited with status {code} before {what}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.25)
    raise ChildFailed(f"{child.name}: not {what} after {timeout:.0f} s ({url})")
