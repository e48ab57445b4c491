"""/metrics of a real server after real traffic, and a real Prometheus scraping it.

One in-process server (the session's SmolLM2 on CPU) and, where the `prometheus` binary
exists, one Prometheus scraping it every second are started for the module; one burst of
streaming requests goes through them, with prefill-only, decode-only and mixed steps. The
tests then check the server's histograms and counters against what the clients saw, that
every PromQL expression of dashboards/grafana.json returns data from Prometheus, and that
the dashboard's step-split panels (attention share, attention and non-attention ms per
step) show each phase over a 20-second window with the values of the server's own sums.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.api.endpoint import ServerSettings
from server.engine import EngineConfig
from tests.server.conftest import inprocess_server, wait_for
from tests.server.engine.test_metrics_dashboard_files import load_builder
from tests.server.engine.test_metrics_unit import parse_exposition

pytestmark = pytest.mark.timeout(600)
P = "attnserve_"
DASHBOARD = Path(__file__).resolve().parents[3] / "dashboards" / "grafana.json"
INSTALL = "apt-get install -y prometheus"
SCRAPE_INTERVAL_S = 1
STEP_SPLIT_WINDOW_S = 20
PHASES = ("prefill", "decode", "mixed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus process scraping one target every second, with its HTTP API."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n  - job_name: attnserve\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self._ready, 60, 0.2, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: object) -> dict:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def instant(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def vector(self, expr: str, at_unix: float) -> list[tuple[dict[str, str], float]]:
        """Each series of an instant query evaluated at ``at_unix``: (labels, value)."""
        result = self.api("query", query=expr, time=at_unix)["result"]
        return [(series["metric"], float(series["value"][1])) for series in result]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def prometheus_binary() -> str | None:
    binary = shutil.which("prometheus")
    if binary is None and os.environ.get("CI"):
        pytest.fail(f"CI is set but the prometheus binary is missing: {INSTALL}")
    return binary


@dataclass
class ClientResult:
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    client_ttft_s: float
    server_ttft_s: float | None = None  # /generate reports the engine's own timing


@dataclass
class TrafficRun:
    results: list[ClientResult]
    before: list[tuple[str, dict[str, str], float]]
    after: list[tuple[str, dict[str, str], float]]
    labels: dict[str, str]
    prometheus: Prometheus | None
    start_unix: float
    end_unix: float
    scraped_unix: float | None = None  # Prometheus holds a scrape taken after the traffic
    notes: list[str] = field(default_factory=list)

    def delta(self, name: str, **labels: str) -> float:
        def total(samples: list[tuple[str, dict[str, str], float]]) -> float:
            return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())
        return total(self.after) - total(self.before)


async def sse_payloads(response: httpx.Response):
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


async def generate_stream(client: httpx.AsyncClient, ids: list[int], max_tokens: int
                          ) -> ClientResult:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0}}
    sent = time.monotonic()
    first = None
    last: dict = {}
    async with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in sse_payloads(response):
            assert "error" not in chunk, chunk
            if first is None and chunk["token_ids"]:
                first = time.monotonic()
            last = chunk
    assert first is not None and last["finished"], last
    return ClientResult("/generate", len(ids), last["completion_tokens"], first - sent,
                        last["timing"]["ttft_s"])


async def completion_stream(client: httpx.AsyncClient, ids: list[int], max_tokens: int
                            ) -> ClientResult:
    body = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.monotonic()
    first = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in sse_payloads(response):
            if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                first = time.monotonic()
            usage = chunk.get("usage") or usage
    assert usage is not None
    if first is None:  # every token decoded to empty text so far: the usage chunk is last
        first = time.monotonic()
    return ClientResult("/v1/completions", usage["prompt_tokens"], usage["completion_tokens"],
                        first - sent)


async def send_traffic(base_url: str, rng: random.Random) -> list[ClientResult]:
    """Seven staggered streams: some share a prompt prefix (prefix-cache hits). The first
    one is alone for its first step (a prefill-only step) and then decodes for 32 tokens,
    so the later ones arrive while it decodes (mixed steps); the last one outlives the
    others (decode-only steps)."""
    shared = [rng.randrange(100, 40000) for _ in range(40)]

    async def one(i: int, client: httpx.AsyncClient) -> ClientResult:
        await asyncio.sleep(0.15 * i)
        tail = [rng.randrange(100, 40000) for _ in range(rng.randint(3, 30))]
        ids = shared + tail if i % 2 == 0 else tail
        # the last stream outlives the others by >= 12 tokens: decode-only steps are certain
        max_tokens = {0: 32, 6: 24}.get(i, rng.randint(4, 12))
        if i % 3 == 2:
            return await completion_stream(client, ids, max_tokens)
        return await generate_stream(client, ids, max_tokens)

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return list(await asyncio.gather(*(one(i, client) for i in range(7))))


def scrape(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    r.raise_for_status()
    return parse_exposition(r.content)


@pytest.fixture(scope="module")
def traffic() -> Iterator[TrafficRun]:
    # A small token budget: prompts of 43 to 70 tokens are prefilled in chunks.
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=2048, max_model_len=512,
                          max_num_batched_tokens=64)
    binary = prometheus_binary()
    # A replica name, as behind a router: the dashboard's replica variable and panels see it.
    settings = ServerSettings(replica_name="replica-0")
    with inprocess_server(config, settings) as server, tempfile.TemporaryDirectory() as tmp:
        prometheus = None
        if binary is not None:
            prometheus = Prometheus(binary, server.base_url.removeprefix("http://"), Path(tmp))
        try:
            if prometheus is not None:  # a scrape before the traffic: rates start from 0
                wait_for(lambda: prometheus.instant(f"{P}generation_tokens_total") is not None,
                         60, 0.2, "the first scrape")
            before = scrape(server.base_url)
            start = time.time()
            results = asyncio.run(send_traffic(server.base_url, random.Random()))
            server.wait_idle()
            end = time.time()
            after = scrape(server.base_url)
            labels = next(lab for n, lab, _ in after if n == f"{P}num_requests_running")
            scraped = None
            if prometheus is not None:  # a scrape after the traffic
                want = sum(v for n, _, v in after if n == f"{P}generation_tokens_total")
                wait_for(lambda: prometheus.instant(f"sum({P}generation_tokens_total)") == want,
                         60, 0.2, "a scrape after the traffic")
                scraped = time.time()
            yield TrafficRun(results, before, after, labels, prometheus, start, end, scraped)
        finally:
            if prometheus is not None:
                prometheus.stop()


def test_request_histograms_and_token_counters_match_the_clients(traffic: TrafficRun) -> None:
    n = len(traffic.results)
    assert traffic.delta(P + "time_to_first_token_seconds_count") == n
    assert traffic.delta(P + "e2e_request_latency_seconds_count") == n
    assert traffic.delta(P + "request_success_total") == n
    assert traffic.delta(P + "prompt_tokens_total") == sum(r.prompt_tokens for r in traffic.results)
    assert traffic.delta(P + "generation_tokens_total") == sum(
        r.completion_tokens for r in traffic.results)
    itl_count = traffic.delta(P + "inter_token_latency_seconds_count")
    assert itl_count == sum(r.completion_tokens - 1 for r in traffic.results)
    for r in traffic.results:
        if r.server_ttft_s is not None:
            assert 0 < r.server_ttft_s <= r.client_ttft_s, r
    ttft_sum = traffic.delta(P + "time_to_first_token_seconds_sum")
    assert ttft_sum <= sum(r.client_ttft_s for r in traffic.results)
    assert ttft_sum >= sum(r.server_ttft_s or 0.0 for r in traffic.results) - 1e-6
    assert traffic.delta(P + "prefix_cache_hits_total") > 0


def test_steps_of_each_phase_observed_and_attention_timed_on_every_step(traffic: TrafficRun
                                                                        ) -> None:
    for phase in PHASES:
        steps = traffic.delta(P + "step_duration_seconds_count", phase=phase)
        assert steps > 0, f"the traffic made no {phase} step"
        # Attention is observed on every step, graph replays included: same count.
        assert traffic.delta(P + "attention_duration_seconds_count", phase=phase) == steps
        attention_s = traffic.delta(P + "attention_duration_seconds_sum", phase=phase)
        assert 0 < attention_s < traffic.delta(P + "step_duration_seconds_sum", phase=phase)
    assert traffic.delta(P + "step_duration_seconds_count", phase="decode") >= 8
    assert traffic.delta(P + "iteration_tokens_count") == sum(
        traffic.delta(P + "step_duration_seconds_count", phase=p) for p in PHASES)


def substitute(expr: str, labels: dict[str, str], rate_interval_s: int = 10 * SCRAPE_INTERVAL_S
               ) -> str:
    """Grafana's variables as a scrape of this server would resolve them."""
    out = (expr.replace("$__rate_interval", f"{rate_interval_s}s")
           .replace("$model_name", ".*")  # any name: it may hold regex characters
           .replace("$attention_backend", labels["attention_backend"])
           .replace("$kv_layout", labels["kv_layout"])
           .replace("$replica", labels["replica"]))
    assert "$" not in out, out
    return out


def test_every_dashboard_query_returns_data_from_prometheus(traffic: TrafficRun) -> None:
    prometheus = traffic.prometheus
    if prometheus is None:
        pytest.skip(f"the prometheus binary is missing: {INSTALL}")
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = substitute(target["expr"], traffic.labels)
            data = prometheus.api("query_range", query=expr, start=traffic.start_unix - 2,
                                  end=time.time(), step=SCRAPE_INTERVAL_S)
            values = [float(v) for series in data["result"] for _, v in series["values"]]
            finite = [v for v in values if math.isfinite(v)]
            if not finite:
                empty.append((panel["title"], expr))
            if panel["title"] == "Attention share of step time":
                assert all(0 < v <= 1 for v in finite), (expr, finite)
    assert not empty, f"queries without data: {empty}"
    # The variables' label_values() queries list this server's labels.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = variable["query"][len("label_values("):-1].rsplit(", ", 1)
        match = selector.replace('"$model_name"', '".*"').replace(
            '"$attention_backend"', f'"{traffic.labels["attention_backend"]}"').replace(
            '"$kv_layout"', f'"{traffic.labels["kv_layout"]}"')
        series = prometheus.api("series", **{"match[]": match, "start": traffic.start_unix - 60})
        assert traffic.labels[label] in {s[label] for s in series}, (variable["name"], series)


def test_step_split_panels_show_every_phase_over_a_20_second_window(traffic: TrafficRun
                                                                     ) -> None:
    """The dashboard's own expressions (from dashboards/build_grafana.py), evaluated by
    Prometheus over a window that holds the whole traffic and a scrape before it: each
    phase has an attention share in (0, 1] and attention and non-attention ms > 0, and they
    are the values of the server's own sums over the traffic."""
    prometheus = traffic.prometheus
    if prometheus is None:
        pytest.skip(f"the prometheus binary is missing: {INSTALL}")
    assert traffic.scraped_unix is not None
    # 20 s, or longer on a machine slow enough that the traffic did not fit in it.
    window_s = max(STEP_SPLIT_WINDOW_S,
                   math.ceil(traffic.scraped_unix - traffic.start_unix) + 3 * SCRAPE_INTERVAL_S)
    expected = {}
    for phase in PHASES:
        steps = traffic.delta(P + "step_duration_seconds_count", phase=phase)
        step_s = traffic.delta(P + "step_duration_seconds_sum", phase=phase)
        attention_s = traffic.delta(P + "attention_duration_seconds_sum", phase=phase)
        expected[phase] = {"share": attention_s / step_s, "attention_ms": 1000 * attention_s / steps,
                           "other_ms": 1000 * (step_s - attention_s) / steps}
    builder = load_builder()
    panels = {p.title: p for p in builder.panels()}
    keys = {builder.ATTENTION_SHARE_PANEL: "share", builder.ATTENTION_MS_PANEL: "attention_ms",
            builder.NON_ATTENTION_MS_PANEL: "other_ms"}
    assert set(keys) == set(builder.STEP_SPLIT_PANELS)
    for title, key in keys.items():
        for target in panels[title].targets:
            expr = substitute(target.expr, traffic.labels, window_s)
            series = prometheus.vector(expr, traffic.scraped_unix)
            assert series, (title, expr)
            for labels, _ in series:
                for name in builder.SERIES_LABELS:  # the legend's labels are kept
                    assert labels.get(name) == traffic.labels.get(name), (title, name, labels)
            if "phase" not in target.expr:  # the share over all steps
                (_, value), = series
                assert 0 < value <= 1, (title, expr, value)
                continue
            by_phase = {labels["phase"]: value for labels, value in series}
            for phase in PHASES:
                value = by_phase.get(phase)
                assert value is not None and math.isfinite(value), (title, phase, by_phase)
                assert value > 0 and (key != "share" or value <= 1), (title, phase, value)
                # rate() extrapolates numerator and denominator alike, to within a
                # scrape interval of the window; the ratio is the server's own.
                assert value == pytest.approx(expected[phase][key], rel=0.05), (title, phase)
