"""Broken streams count as failed requests with their error, and the run goes on."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.runner import RunConfig, run_benchmark
from loadtest.workloads import WorkloadOptions, build_trace
from tests.loadtest.scripted_server import Script, ScriptedSSEServer


@pytest.mark.parametrize(("mode", "message"), [
    ("garbage", "JSONDecodeError"),
    ("error_event", "engine died"),
    ("empty", "without any token"),
])
def test_broken_streams_are_failures_with_samples(mode: str, message: str) -> None:
    trace = build_trace(WorkloadOptions(num_prompts=3, input_len=4, output_len=3))
    with ScriptedSSEServer(Script(ttft_s=0.002, gaps_s=[0.001, 0.001], mode=mode)) as server:
        cfg = RunConfig(base_url=server.base_url, show_progress=False)
        result = asyncio.run(run_benchmark(cfg, trace))
    assert result["completed"] == 0 and result["failed"] == 3
    assert len(result["error_samples"]) == 1 and result["error_samples"][0]["count"] == 3
    assert message in result["error_samples"][0]["error"]
    assert result["mean_ttft_ms"] is None and result["total_output_tokens"] == 0


def test_unreachable_server_is_a_failure_not_a_crash() -> None:
    trace = build_trace(WorkloadOptions(num_prompts=2, input_len=4, output_len=2))
    cfg = RunConfig(base_url="http://127.0.0.1:9", show_progress=False, request_timeout_s=5)
    result = asyncio.run(run_benchmark(cfg, trace))
    assert result["failed"] == 2 and "ConnectError" in result["error_samples"][0]["error"]
    assert result["server_metrics"] == {"available": False}
