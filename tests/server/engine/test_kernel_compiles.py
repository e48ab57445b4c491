"""Kernel instances built after start-up are logged and counted
(attnserve_kernel_compiles_total), and the start-up warm-up step (ModelRunner.warm_up) leaves
the KV pool and the requests' outputs untouched. Nothing compiles on CPU, so a build is
simulated by growing a watched kernel's cache the way Triton does."""

from __future__ import annotations

import logging

import pytest
import torch

from scheduler.request import SamplingParams
from tests.attention.test_compile_watch import build, fake_kernel_module
from tests.server.engine.test_metrics_engine import make_engine, run_to_completion
from tests.server.engine.test_metrics_unit import parse_exposition, sample

pytestmark = pytest.mark.timeout(300)
P = "attnserve_"


def test_kernels_built_by_a_step_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, metrics = make_engine()
    name, kernel, _ = fake_kernel_module(monkeypatch)
    engine.kernel_watch.kernels = {"fake.kernel_a": kernel}
    engine.kernel_watch.last = engine.kernel_watch.counts()

    engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=3))
    engine.step()  # builds nothing
    assert engine.serving_compiles == 0
    build(kernel)
    build(kernel)  # as if the next step had met two new specialisations
    with caplog.at_level(logging.WARNING, logger="server.engine.core"):
        engine.step()
    assert engine.serving_compiles == 2
    assert any("fake.kernel_a x2" in r.getMessage() for r in caplog.records)
    run_to_completion(engine)
    assert engine.serving_compiles == 2

    samples = parse_exposition(metrics.render()[0])
    labels = {"attention_backend": engine.backend.name, "kv_layout": engine.layout.name}
    assert sample(samples, P + "kernel_compiles_total", **labels) == 2.0
    assert sample(samples, P + "kernel_compile_step_seconds_total", **labels) > 0.0


def test_warm_up_steps_leave_pages_and_outputs_untouched() -> None:
    engine, _ = make_engine(enable_prefix_cache=False)  # both runs compute every token
    prompt = list(range(200, 240))
    params = SamplingParams(temperature=0.0, max_tokens=8)

    def generate() -> list[int]:
        outputs = []
        engine.add_request(prompt, params, sink=outputs.append)
        run_to_completion(engine)
        return [t for out in outputs for t in out.new_token_ids]

    first = generate()
    free_before = engine.allocator.num_free
    caches = (*engine.pool.k_caches, *engine.pool.v_caches)
    for c in caches:
        c[0].fill_(float("nan"))  # the scratch page: the warm-up's K/V land here
    pages = [c[1:].clone() for c in caches]
    engine.runner.warm_up()
    assert engine.allocator.num_free == free_before
    assert all(torch.isfinite(c[0]).any() for c in caches), "warm-up stored nothing"
    assert all(torch.equal(c[1:], before) for c, before in zip(caches, pages, strict=True))
    assert len(first) == 8 and generate() == first
