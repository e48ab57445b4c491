"""Each rate of a sweep starts on a cold prefix cache: the sweep empties the server's cache
(POST /reset_prefix_cache) before every run, or, where the server has no such endpoint,
starts a fresh server per rate; --keep-prefix-cache keeps the old behaviour.

The scripted server keeps a prefix cache of the prompts it has seen and exports its
queries and hits (prompt tokens) as attnserve does, so a rerun of the same trace on a warm
cache shows hits of (n - 1) / n of the prompt tokens, and a cold one none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from loadtest.cli import main
from loadtest.runner import RunConfig, run_benchmark
from loadtest.workloads import WorkloadOptions, build_trace
from tests.loadtest.scripted_server import Script, ScriptedSSEServer

SCRIPTED_SERVER = Path(__file__).with_name("scripted_server.py")
INPUT_LEN = 10
WARM_HIT_RATE = (INPUT_LEN - 1) / INPUT_LEN  # all prompt tokens but the last


def _run_twice(script: Script, reset: bool) -> tuple[dict, dict, ScriptedSSEServer]:
    trace = build_trace(WorkloadOptions(num_prompts=4, input_len=INPUT_LEN, output_len=2))
    with ScriptedSSEServer(script) as server:
        cfg = RunConfig(base_url=server.base_url, show_progress=False, reset_prefix_cache=reset)
        first = asyncio.run(run_benchmark(cfg, trace))
        second = asyncio.run(run_benchmark(cfg, trace))
    return first, second, server


def test_a_rerun_hits_the_cache_unless_it_is_reset() -> None:
    script = Script(ttft_s=0.002, gaps_s=[0.001])
    _, warm, server = _run_twice(script, reset=False)
    assert server.counters.resets == 0
    assert warm["server_metrics"]["prefix_cache_hit_rate"] == pytest.approx(WARM_HIT_RATE)
    assert warm["prefix_cache_cold"] is None and warm["prefix_cache_reset"] is None

    first, cold, server = _run_twice(script, reset=True)
    assert server.counters.resets == 2
    assert ("POST", "/reset_prefix_cache", None) in server.counters.seen
    for run in (first, cold):
        assert run["server_metrics"]["prefix_cache_hit_rate"] == 0
        assert run["prefix_cache_cold"] is True and run["prefix_cache_cold_by"] == "reset"
        assert run["prefix_cache_reset"]["status"] == "reset"


def test_a_server_without_the_endpoint_makes_the_run_warm_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = Script(ttft_s=0.002, gaps_s=[0.001], reset_endpoint=False)
    _, warm, _ = _run_twice(script, reset=True)
    assert warm["prefix_cache_cold"] is False
    assert warm["prefix_cache_reset"]["status"] == "unsupported"
    assert warm["server_metrics"]["prefix_cache_hit_rate"] == pytest.approx(WARM_HIT_RATE)
    # The single-run command line warns once and records it.
    out = tmp_path / "run.json"
    with ScriptedSSEServer(script) as server, caplog.at_level(logging.WARNING):
        code = main(["--base-url", server.base_url, "--num-prompts", "2", "--input-len", "4",
                     "--output-len", "2", "--reset-prefix-cache", "--disable-tqdm",
                     "--output", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["prefix_cache_cold"] is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "warm" in warnings[0].getMessage()


def _sweep(tmp_path: Path, *flags: str, configs: tuple[str, ...] = ("a=--ttft-ms 5",)
           ) -> tuple[int, dict[tuple[str, str], dict], Path]:
    out_dir = tmp_path / "sweep"
    argv = ["sweep", "--server-command", f"{sys.executable} {SCRIPTED_SERVER}",
            "--server-args", "--itl-ms 1", "--request-rates", "50", "inf",
            "--num-prompts", "4", "--input-len", str(INPUT_LEN), "--output-len", "2",
            "--warmup", "1", "--output-dir", str(out_dir), "--disable-tqdm",
            "--startup-timeout", "30", *flags]
    for config in configs:
        argv += ["--server-config", config]
    code = main(argv)
    runs = {(r["config_name"], str(r["request_rate"])): r
            for r in json.loads((out_dir / "sweep.json").read_text())}
    return code, runs, out_dir


def test_sweep_resets_the_cache_before_every_rate(tmp_path: Path) -> None:
    code, runs, out_dir = _sweep(tmp_path)
    assert code == 0 and set(runs) == {("a", "50.0"), ("a", "inf")}
    for rate, served_before in (("50.0", 0), ("inf", 1)):
        run = runs[("a", rate)]
        assert run["server_launch"]["runs_served_before"] == served_before  # one server
        assert run["prefix_cache_mode"] == "reset"
        assert run["prefix_cache_cold"] is True and run["prefix_cache_cold_by"] == "reset"
        assert run["server_metrics"]["prefix_cache_hit_rate"] == 0
    assert [p.name for p in out_dir.glob("server_*.log")] == ["server_a.log"]
    table = (out_dir / "summary.md").read_text().splitlines()
    header = [c.strip() for c in table[0].split("|")]
    assert [row.split("|")[header.index("prefix cache")].strip() for row in table[2:4]] \
        == ["cold (reset)", "cold (reset)"]


def test_sweep_keeps_the_cache_when_asked(tmp_path: Path) -> None:
    code, runs, _ = _sweep(tmp_path, "--keep-prefix-cache")
    assert code == 0
    first, second = runs[("a", "50.0")], runs[("a", "inf")]
    assert first["prefix_cache_cold"] is True and first["prefix_cache_cold_by"] == "fresh server"
    assert first["server_metrics"]["prefix_cache_hit_rate"] == 0
    # The all-at-once rerun of the same trace measures the cache.
    assert second["prefix_cache_cold"] is False and second["prefix_cache_mode"] == "keep"
    assert second["server_metrics"]["prefix_cache_hit_rate"] == pytest.approx(WARM_HIT_RATE)


def test_sweep_restarts_a_server_that_cannot_reset_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        code, runs, out_dir = _sweep(tmp_path, configs=("a=--no-reset-endpoint",
                                                        "b=--no-reset-endpoint --ttft-ms 3"))
    assert code == 0 and len(runs) == 4
    for name in ("a", "b"):
        first, second = runs[(name, "50.0")], runs[(name, "inf")]
        assert first["prefix_cache_reset"]["status"] == "unsupported"
        assert first["prefix_cache_cold_by"] == "fresh server"
        assert second["prefix_cache_mode"] == "restart" and second["prefix_cache_reset"] is None
        for run in (first, second):
            assert run["server_launch"]["runs_served_before"] == 0  # a fresh server each
            assert run["prefix_cache_cold"] is True
            assert run["server_metrics"]["prefix_cache_hit_rate"] == 0
    assert sorted(p.name for p in out_dir.glob("server_*.log")) == [
        "server_a.log", "server_a_rate-inf.log", "server_b.log", "server_b_rate-inf.log"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/reset_prefix_cache" in warnings[0]


def test_keep_and_restart_contradict(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["sweep", "--server-config", "a=", "--keep-prefix-cache", "--restart-per-rate",
              "--output-dir", str(tmp_path)])
