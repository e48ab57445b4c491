"""Issue 24: the engine with an FP8 KV cache (SmolLM2, CPU, reference backend).

The scales live beside the pages and are indexed by slot, so whatever owns a page owns its
scales: the prefix cache shares them (cache on and off give the same tokens) and preemption
frees and recomputes them (a preempted run gives the tokens of an unpreempted one). Also the
flags, the capacity that follows from the bytes per token, and what stats, the start-up log
line and the metrics report.
"""

from __future__ import annotations

import logging

import pytest
import torch

from loadtest.sweep import _args_from_mapping
from scheduler.request import SamplingParams
from server.cli import build_parser
from server.engine.args import engine_config_from_args
from server.engine.metrics import EngineMetrics
from tests.server import engine_fixtures
from tests.server.engine.test_prefix_engine import system_prompt_workload
from tests.server.engine_fixtures import make_llm

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
FP8 = {"kv_cache_dtype": "fp8"}


def _config(*flags: str):
    return engine_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_flags() -> None:
    default = _config()
    assert (default.kv_cache_dtype, default.kv_cache_scale) == ("auto", "per-token-head")
    config = _config("--kv-cache-dtype", "fp8_e4m3", "--kv-cache-scale", "per-tensor",
                     "--kv-cache-memory", "1000000")
    assert (config.kv_cache_dtype, config.kv_cache_scale) == ("fp8_e4m3", "per-tensor")
    assert config.kv_cache_memory == 1_000_000
    assert config.resolved_kv_cache_dtype().dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="give one of them"):
        _config("--kv-cache-tokens", "64", "--kv-cache-memory", "1000000")
    with pytest.raises(SystemExit):
        _config("--kv-cache-dtype", "int8")
    # a loadtest sweep's configuration (a JSON mapping) becomes flags serve accepts
    sweep_flags = _args_from_mapping({"kv_cache_dtype": "fp8", "kv_cache_scale": "per-tensor"})
    assert _config(*sweep_flags).resolved_kv_cache_dtype().scale_mode == "per-tensor"


def test_prefix_cache_on_and_off_give_the_same_tokens() -> None:
    """Cached pages are shared with their scales: the later prompts read the system
    prompt's codes and scales that the first one stored (hnd_x: runs of x = 16 codes)."""
    system, prompts = system_prompt_workload()
    outputs = {}
    for cache in (False, True):
        llm = make_llm(kv_layout="hnd_x", page_size=16, enable_prefix_cache=cache, **FP8)
        first = llm.generate(prompts[:1], GREEDY)
        rest = llm.generate(prompts[1:2], GREEDY)
        outputs[cache] = [r.token_ids for r in first + rest]
        hits = llm.engine.scheduler.stats.prefix_cache_hit_tokens
        assert hits == (192 if cache else 0)  # whole pages of the 200 shared tokens
    assert outputs[True] == outputs[False]


def test_preemption_frees_and_recomputes_pages_and_scales() -> None:
    """A preempted request's pages (and so its scales) go back to the allocator and are
    recomputed on readmission. The tokens are compared with an unpreempted FP8 run at the
    same step budget: not all equal, because a different batch composition rounds K/V
    differently in float32 and FP8 codes flip where full precision would not
    (docs/kernels.md, "FP8 KV cache"), so the test asks for the first tokens of every
    request and 75% of all tokens; stale or foreign scales would give neither."""
    prompts = engine_fixtures.test_prompts()[:5]  # (imported by name, pytest would collect it)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    common = dict(kv_layout="hnd", page_size=16, max_num_batched_tokens=64,
                  enable_prefix_cache=False, **FP8)
    want = [r.token_ids for r in make_llm(**common).generate(prompts, params)]
    tight = make_llm(kv_cache_tokens=128, **common)  # 5 prompts of ~36 tokens + 16 new each
    got = [r.token_ids for r in tight.generate(prompts, params)]
    assert tight.engine.scheduler.stats.num_preemptions_total > 0
    assert tight.engine.allocator.num_free == tight.engine.allocator.num_total
    assert [g[:4] for g in got] == [w[:4] for w in want]
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert same >= 0.75 * sum(len(w) for w in want)


def test_capacity_stats_log_line_and_metrics(caplog: pytest.LogCaptureFixture) -> None:
    """On CPU the default pool is the memory of 16384 float32 tokens: FP8 codes + scales
    hold (4 * 64) / (64 + 4) = 3.76x the tokens (SmolLM2: head dim 64)."""
    full = make_llm(kv_cache_tokens=None)
    with caplog.at_level(logging.INFO, logger="server.engine.core"):
        fp8 = make_llm(kv_cache_tokens=None, **FP8)
    tokens = fp8.engine.pool.num_tokens
    assert full.engine.pool.num_tokens == 16384
    assert tokens / 16384 == pytest.approx(4 * 64 / (64 + 4), rel=2e-3)
    assert fp8.engine.pool.nbytes <= full.engine.pool.nbytes
    stats = fp8.engine.stats()
    assert (stats["kv_cache_dtype"], stats["kv_cache_scale"]) == ("fp8_e4m3", "per-token-head")
    assert stats["kv_cache_tokens"] == tokens
    line = next(r.getMessage() for r in caplog.records if "engine ready" in r.getMessage())
    assert "kv_cache_dtype=fp8_e4m3 kv_cache_scale=per-token-head" in line
    assert f"kv_tokens={tokens}" in line
    metrics = EngineMetrics.attach(fp8.engine)
    body = metrics.render()[0].decode()
    assert 'kv_cache_dtype="fp8_e4m3"' in body
    info = next(line for line in body.splitlines()
                if line.startswith("attnserve_engine_config_info{"))
    assert 'kv_cache_scale="per-token-head"' in info and f'kv_cache_tokens="{tokens}"' in info
    per_tensor = make_llm(kv_cache_tokens=None, kv_cache_scale="per-tensor", **FP8)
    # the memory of 1024 + 1 float32 pages (the scratch page counted) holds 4 x 1025 FP8
    # pages without scales, one of them scratch
    assert per_tensor.engine.pool.num_tokens == (4 * (16384 // 16 + 1) - 1) * 16
    assert per_tensor.engine.stats()["kv_cache_scale"] == "per-tensor"
