"""Benchmark metrics with vLLM's definitions and field names.

TTFT: send to the first event that carries a token. TPOT: (E2E - TTFT) / (output tokens
- 1), for requests with more than one output token. ITL: gaps between consecutive token
events, pooled over all requests. E2EL: send to the last token's event. Percentiles
interpolate linearly (numpy's default), std is the population standard deviation; times
are reported in milliseconds.

Peaks over one-second buckets counted from the earliest start of a successful request:
``max_output_tokens_per_s`` is the most token events that arrived in one bucket, and
``max_concurrent_requests`` the most successful requests whose span (start to last token)
touched one bucket.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.client import RequestResult

DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile_label(p: float) -> str:
    """vLLM's spelling: 99 -> 'p99', 99.9 -> 'p99.9'."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def parse_goodput(items: list[str]) -> dict[str, float]:
    """'ttft:500 tpot:50 e2el:4000' (milliseconds) -> {'ttft': 500.0, ...}."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in {GOODPUT_KEYS}, got {item!r}")
        slos[key] = float(value)
        if slos[key] <= 0:
            raise ValueError(f"--goodput {key} must be positive")
    return slos


def request_tpot(r: RequestResult) -> float:
    """Seconds per output token after the first; 0 for single-token answers (as vLLM)."""
    if r.output_tokens > 1:
        return (r.latency - r.ttft) / (r.output_tokens - 1)
    return 0.0


def meets_slos(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": request_tpot(r), "e2el": r.latency}
    return all(values[key] * 1000.0 <= limit for key, limit in slos_ms.items())


@dataclass
class Distribution:
    values_s: list[float]

    def fields(self, metric: str, percentiles: tuple[float, ...]) -> dict[str, float | None]:
        arr = np.asarray(self.values_s, dtype=float) * 1000.0
        empty = arr.size == 0
        out: dict[str, float | None] = {
            f"mean_{metric}_ms": None if empty else float(arr.mean()),
            f"median_{metric}_ms": None if empty else float(np.median(arr)),
            f"std_{metric}_ms": None if empty else float(arr.std()),
        }
        for p in percentiles:
            out[f"{percentile_label(p)}_{metric}_ms"] = (
                None if empty else float(np.percentile(arr, p)))
        return out


def peak_buckets(ok: list[RequestResult]) -> tuple[float, int]:
    """(max_output_tokens_per_s, max_concurrent_requests) of the successful requests."""
    if not ok:
        return 0.0, 0
    origin = min(r.start_time for r in ok)
    tokens: Counter[int] = Counter()
    in_flight: Counter[int] = Counter()
    for r in ok:
        # The token events' arrivals, rebuilt from the request's start, TTFT and gaps.
        arrival = r.start_time + r.ttft
        tokens[int(arrival - origin)] += 1
        for gap in r.itl:
            arrival += gap
            tokens[int(arrival - origin)] += 1
        first, last = int(r.start_time - origin), int(r.start_time + r.latency - origin)
        in_flight.update(range(first, last + 1))
    return float(max(tokens.values())), max(in_flight.values())


def _error_samples(results: list[RequestResult], limit: int) -> list[dict[str, Any]]:
    counts = Counter(r.error for r in results if not r.success)
    return [{"error": err, "count": n} for err, n in counts.most_common(limit)]


def summarize(
    results: list[RequestResult],
    duration_s: float,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
    goodput_slos_ms: dict[str, float] | None = None,
    max_error_samples: int = 5,
) -> dict[str, Any]:
    """The result fields of one run, keyed as vLLM's benchmark keys them."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    peak_tokens, peak_requests = peak_buckets(ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
        "error_samples": _error_samples(results, max_error_samples),
    }
    if goodput_slos_ms:
        out["request_goodput"] = sum(meets_slos(r, goodput_slos_ms) for r in ok) / dur
        out["goodput_slos_ms"] = dict(goodput_slos_ms)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [request_tpot(r) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for metric in LATENCY_METRICS:
        out.update(Distribution(series[metric]).fields(metric, percentiles))
    return out


def per_request_details(results: list[RequestResult]) -> dict[str, list[Any]]:
    """The per-request arrays vLLM saves with --save-detailed (seconds; a failed request
    has zeros and its error), then attnserve's own: ``send_offsets`` (seconds after the run
    started) and ``output_tokens_sources`` (where each output count came from)."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "send_offsets": [r.send_offset for r in results],
        "output_tokens_sources": [r.output_tokens_source for r in results],
    }
