"""Summary statistics, goodput and vLLM's field names, against hand-written references."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from loadtest.client import RequestResult
from loadtest.stats import parse_goodput, percentile_label, summarize


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (the definition numpy and vLLM use)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _random_results(rng: np.random.Generator, n: int) -> list[RequestResult]:
    results = []
    for _ in range(n):
        tokens = int(rng.integers(1, 12))
        itl = rng.uniform(0.005, 0.08, size=tokens - 1).tolist()
        ttft = float(rng.uniform(0.01, 0.5))
        results.append(RequestResult(
            success=True, prompt_len=int(rng.integers(1, 500)), output_tokens=tokens,
            ttft=ttft, itl=itl, latency=ttft + sum(itl) + float(rng.uniform(0, 0.003))))
    return results


def test_fields_and_values_match_a_reference() -> None:
    rng = np.random.default_rng()
    ok = _random_results(rng, int(rng.integers(20, 60)))
    failed = [RequestResult(error="HTTP 500: boom"), RequestResult(error="HTTP 500: boom"),
              RequestResult(error="ReadTimeout: slow")]
    duration = float(rng.uniform(2, 10))
    percentiles = (90.0, 95.0, 99.0, 99.9)
    out = summarize(ok + failed, duration, percentiles)

    assert out["completed"] == len(ok) and out["failed"] == 3
    assert out["total_input_tokens"] == sum(r.prompt_len for r in ok)
    assert out["total_output_tokens"] == sum(r.output_tokens for r in ok)
    assert out["request_throughput"] == pytest.approx(len(ok) / duration)
    assert out["output_throughput"] == pytest.approx(out["total_output_tokens"] / duration)
    assert out["total_token_throughput"] == pytest.approx(
        (out["total_input_tokens"] + out["total_output_tokens"]) / duration)
    assert out["error_samples"] == [{"error": "HTTP 500: boom", "count": 2},
                                    {"error": "ReadTimeout: slow", "count": 1}]
    series = {
        "ttft": [r.ttft * 1000 for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000
                 for r in ok if r.output_tokens > 1],
        "itl": [g * 1000 for r in ok for g in r.itl],
        "e2el": [r.latency * 1000 for r in ok],
    }
    for metric, values in series.items():
        assert out[f"mean_{metric}_ms"] == pytest.approx(statistics.fmean(values))
        assert out[f"median_{metric}_ms"] == pytest.approx(statistics.median(values))
        assert out[f"std_{metric}_ms"] == pytest.approx(statistics.pstdev(values))
        for p in percentiles:
            key = f"{percentile_label(p)}_{metric}_ms"
            assert out[key] == pytest.approx(_percentile(values, p)), key
    for key in ("p90_ttft_ms", "p95_tpot_ms", "p99_itl_ms", "p99.9_e2el_ms", "request_goodput"):
        assert key in out


def test_goodput_counts_requests_within_every_slo() -> None:
    rng = np.random.default_rng()
    results = _random_results(rng, 200)
    slos = {"ttft": float(rng.uniform(100, 400)), "tpot": float(rng.uniform(20, 60)),
            "e2el": float(rng.uniform(300, 900))}
    duration = 7.0
    good = 0
    for r in results:
        tpot_ms = 0.0 if r.output_tokens == 1 else \
            (r.latency - r.ttft) * 1000 / (r.output_tokens - 1)
        if r.ttft * 1000 <= slos["ttft"] and tpot_ms <= slos["tpot"] \
                and r.latency * 1000 <= slos["e2el"]:
            good += 1
    assert 0 < good < len(results)  # the SLOs really split the requests
    out = summarize(results, duration, goodput_slos_ms=slos)
    assert out["request_goodput"] == pytest.approx(good / duration)
    only_ttft = sum(r.ttft * 1000 <= slos["ttft"] for r in results)
    out = summarize(results, duration, goodput_slos_ms={"ttft": slos["ttft"]})
    assert out["request_goodput"] == pytest.approx(only_ttft / duration)
    assert summarize(results, duration)["request_goodput"] is None


def test_goodput_parsing_and_percentile_names() -> None:
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:4000"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 4000.0}
    for bad in (["ttft"], ["itl:5"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert [percentile_label(p) for p in (50, 99.0, 99.9)] == ["p50", "p99", "p99.9"]


def test_no_successful_request_gives_nulls_not_crashes() -> None:
    out = summarize([RequestResult(error="refused")], 1.0)
    assert out["completed"] == 0 and out["failed"] == 1
    assert out["mean_ttft_ms"] is None and out["p99_itl_ms"] is None
