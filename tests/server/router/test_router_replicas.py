"""Two SmolLM2 replicas behind SGLang's router (`attnserve router`), on the CPU.

- The shared-prefix workload (groups of prompts, each group with its own long system
  prompt, arriving interleaved) gets at least 1.5x the prefix-cache hit rate with the
  cache-aware policy than with round-robin over the same workers, measured from the
  workers' own attnserve_prefix_cache_hits_total / queries_total.
- A worker killed mid-load loses no request that had not started on it, and the router
  stops sending to it within seconds.
- A drained worker (SIGTERM) leaves the router's pool while it still serves, then stops.

The router comes from PyPI (`pip install .[router]`, as `make test` does); set
ATTNSERVE_ROUTER_COMMAND to run it from elsewhere (e.g. "/venv/bin/python -m
sglang_router.launch_router").
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import REPO_ROOT, wait_for

MODEL = "SmolLM2-135M-Instruct"
ROUTER_COMMAND = os.environ.get("ATTNSERVE_ROUTER_COMMAND")
LISTENING = re.compile(r"attnserve router listening on (http://\S+)")
READY = re.compile(r"(replica-\d+) ready at (http://\S+) \(pid (\d+)")
NUM_GROUPS = 3
PROMPTS_PER_GROUP = 3
WORDS = ("river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violet",
         "signal", "thunder", "glacier", "saddle", "pepper", "canyon", "marble", "falcon")


def system_prompt(group: int) -> str:
    """About 100 tokens, different for each group from its first words on."""
    words = [WORDS[(group * 7 + i * (group + 3)) % len(WORDS)] for i in range(90)]
    return f"Group {group} rules. " + " ".join(words) + "."


def shared_prefix_trace() -> list[str]:
    """The groups interleaved (g0, g1, g2, g0, ...), as SGLang's shuffled arrivals."""
    return [f"{system_prompt(g)} Question {q}: what comes after {WORDS[q]}?"
            for q in range(PROMPTS_PER_GROUP) for g in range(NUM_GROUPS)]


def router_command() -> list[str]:
    return shlex.split(ROUTER_COMMAND) if ROUTER_COMMAND else \
        [sys.executable, "-m", "sglang_router.launch_router"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Supervisor:
    """`attnserve router` in a subprocess; its output is collected line by line."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    url: str | None = None
    replicas: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (url, pid)

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if (m := LISTENING.search(line)) is not None:
                self.url = m.group(1)
            if (m := READY.search(line)) is not None:
                self.replicas[m.group(1)] = (m.group(2), int(m.group(3)))

    def log(self) -> str:
        return "".join(self.lines[-60:])


@pytest.fixture(scope="module")
def replicas() -> Iterator[Supervisor]:
    cmd = [sys.executable, "-m", "server", "router", "--replicas", "2",
           "--port", str(free_port()), "--policy", "cache_aware",
           "--router-command", shlex.join(router_command()),
           "--max-model-len", "512", "--kv-cache-tokens", "2048", "--disable-log-stats"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO_ROOT)
    sup = Supervisor(proc)
    threading.Thread(target=sup.read, daemon=True).start()
    try:
        wait_for(lambda: sup.url is not None or proc.poll() is not None, 600, 0.2,
                 "the router set to start")
        assert sup.url is not None, f"attnserve router did not start:\n{sup.log()}"
        assert set(sup.replicas) == {"replica-0", "replica-1"}, sup.log()
        yield sup
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def worker_counters(url: str) -> dict[str, float]:
    """A worker's own prefix-cache and request counters, and its replica label."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {"queries": 0.0, "hits": 0.0, "requests": 0.0}
    names = {"attnserve_prefix_cache_queries_total": "queries",
             "attnserve_prefix_cache_hits_total": "hits",
             "attnserve_request_success_total": "requests"}
    replicas = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                out[names[s.name]] += s.value
                replicas.add(s.labels.get("replica"))
    out["replica"] = replicas  # type: ignore[assignment]
    return out


def complete(client: httpx.Client, prompt: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                "max_tokens": 1}, timeout=300)


def hit_rate_through(router_url: str, worker_urls: list[str]) -> float:
    """The shared-prefix trace, one request at a time, through `router_url`, on cold
    caches; the hit rate the workers counted."""
    with httpx.Client(base_url=router_url) as client:
        flushed = client.post("/flush_cache", timeout=60)
        assert flushed.status_code == 200, flushed.text
        before = [worker_counters(u) for u in worker_urls]
        for prompt in shared_prefix_trace():
            response = complete(client, prompt)
            assert response.status_code == 200, response.text
    after = [worker_counters(u) for u in worker_urls]
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    queries = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    assert queries > 0
    return hits / queries


def router_workers(router_url: str) -> dict[str, bool]:
    """Worker URL -> healthy, as the router sees its pool."""
    data = httpx.get(router_url + "/workers", timeout=10).json()
    return {w["url"]: bool(w["is_healthy"]) for w in data["workers"]}


def test_cache_aware_routing_beats_round_robin_on_shared_prefixes(
        replicas: Supervisor) -> None:
    assert replicas.url is not None
    worker_urls = [replicas.replicas[f"replica-{i}"][0] for i in range(2)]
    assert sorted(router_workers(replicas.url)) == sorted(worker_urls)
    for i, url in enumerate(worker_urls):  # each worker's series carry its replica label
        assert worker_counters(url)["replica"] == {f"replica-{i}"}
    # Round-robin: a second router over the same two workers.
    port = free_port()
    rr = subprocess.Popen([*router_command(), "--host", "127.0.0.1", "--port", str(port),
                           "--worker-urls", *worker_urls, "--policy", "round_robin",
                           "--prometheus-port", str(free_port()), "--log-level", "warn"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rr_url = f"http://127.0.0.1:{port}"
    try:
        def rr_ready() -> bool:
            try:
                return httpx.get(rr_url + "/readiness", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(rr_ready, 120, 0.2, "the round-robin router")
        round_robin = hit_rate_through(rr_url, worker_urls)
    finally:
        rr.terminate()
        rr.wait(60)
    cache_aware = hit_rate_through(replicas.url, worker_urls)
    print(f"prefix-cache hit rate: round-robin {round_robin:.3f}, cache-aware {cache_aware:.3f}")
    assert cache_aware > 0.3
    assert cache_aware >= 1.5 * round_robin, (round_robin, cache_aware)


def test_killed_worker_loses_no_request_and_leaves_the_pool(replicas: Supervisor) -> None:
    assert replicas.url is not None
    victim_url, victim_pid = replicas.replicas["replica-1"]
    survivor_url = replicas.replicas["replica-0"][0]
    prompts = [f"Short request {i}: name a colour." for i in range(10)]
    results: dict[int, tuple[float, float, int]] = {}  # i -> (sent, done, status)
    killed_at: list[float] = []
    out_of_pool_at: list[float] = []

    def watch_pool() -> None:  # from the kill on: when does the router drop the worker?
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if killed_at and not router_workers(replicas.url).get(victim_url, False):
                out_of_pool_at.append(time.monotonic())
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_pool, daemon=True)
    watcher.start()

    def send(client: httpx.Client, i: int) -> None:
        sent = time.monotonic()
        try:
            status = complete(client, prompts[i]).status_code
        except httpx.HTTPError:
            status = -1
        results[i] = (sent, time.monotonic(), status)

    with httpx.Client(base_url=replicas.url) as client, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = []
        for i in range(len(prompts)):
            if i == 4:
                os.kill(victim_pid, signal.SIGKILL)
                killed_at.append(time.monotonic())
            futures.append(pool.submit(send, client, i))
            time.sleep(0.3)
        for f in futures:
            f.result()
    kill_time = killed_at[0]
    started_after = [i for i, (sent, _, _) in results.items() if sent >= kill_time]
    in_flight = [i for i, (sent, done, _) in results.items() if sent < kill_time <= done]
    failed = [i for i, (_, _, status) in results.items() if status != 200]
    assert all(results[i][2] == 200 for i in started_after), results
    assert set(failed) <= set(in_flight), (failed, in_flight, results)
    watcher.join(120)
    assert out_of_pool_at, "the router kept the killed worker in its pool"
    left_after = out_of_pool_at[0] - kill_time
    print(f"killed worker out of the pool {left_after:.1f} s after the kill; {len(failed)} of "
          f"{len(in_flight)} requests in flight at the kill failed")
    assert left_after < 10
    before = worker_counters(survivor_url)["requests"]
    with httpx.Client(base_url=replicas.url) as client:
        for i in range(3):
            assert complete(client, f"After the kill {i}").status_code == 200
    assert worker_counters(survivor_url)["requests"] - before == 3


def test_drained_worker_leaves_the_pool_before_it_stops(replicas: Supervisor) -> None:
    assert replicas.url is not None
    url, pid = replicas.replicas["replica-0"]
    assert router_workers(replicas.url)[url]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not router_workers(replicas.url).get(url, False), 15, 0.1,
             "the router to take the draining worker out of its pool")
    # Out of the pool, and still serving: the drain has not started yet.
    with httpx.Client(base_url=url) as client:
        health = client.get("/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
        assert complete(client, "Still there?").status_code == 200

    def stopped() -> bool:
        try:
            httpx.get(url + "/health", timeout=2)
            return False
        except httpx.HTTPError:
            return True

    wait_for(stopped, 60, 0.2, "the drained worker to stop")
    wait_for(lambda: any(f"replica-0 ({url}) exited with status 0" in line
                         for line in replicas.lines), 10, 0.2, "the supervisor to see it exit")
