"""Kernel builds after start-up are logged and counted (attnserve_kernel_compiles_total):
the engine hears Triton's compile hooks (attention/triton/compile_watch.py) and counts only
builds on its own step thread once it is serving. Triton never builds under the CPU
interpreter, so the builds are simulated by calling its hooks the way its JIT does."""

from __future__ import annotations

import logging
import threading

import pytest

from scheduler.request import SamplingParams
from tests.attention.test_compile_watch import build
from tests.server.test_metrics_engine import make_engine, run_to_completion
from tests.server.test_metrics_unit import parse_exposition, sample

pytestmark = pytest.mark.timeout(300)
P = "attnserve_"


def test_builds_while_serving_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    engine, metrics = make_engine()
    assert engine.serving and engine.serving_compiles == 0
    engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=3))
    run_to_completion(engine)  # the step thread is now this one
    with caplog.at_level(logging.WARNING, logger="server.engine"):
        build("_extend_kernel")
    assert engine.serving_compiles == 1
    assert any("_extend_kernel" in r.getMessage() for r in caplog.records)

    other = threading.Thread(target=build, args=("_decode_kernel",))  # not a step: ignored
    other.start()
    other.join()
    assert engine.serving_compiles == 1

    samples = parse_exposition(metrics.render()[0])
    labels = {"attention_backend": engine.backend.name, "kv_layout": engine.layout.name}
    assert sample(samples, P + "kernel_compiles_total", **labels) == 1.0
    assert sample(samples, P + "kernel_compile_seconds_total", **labels) >= 0.0


def test_builds_before_serving_are_start_up_work() -> None:
    engine, _ = make_engine()
    before = len(engine.startup_compiles)
    engine.serving = False  # as during warm-up and graph capture
    build("_rope_store_kernel")
    assert len(engine.startup_compiles) == before + 1 and engine.serving_compiles == 0
