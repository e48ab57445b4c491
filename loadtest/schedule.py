"""Send schedule: arrival times precomputed as cumulative gamma-distributed gaps.

The gaps follow a gamma distribution with shape ``burstiness`` and mean ``1 / rate``
(burstiness 1 is a Poisson process; below 1 is burstier, above 1 more regular). The
cumulative times are then rescaled so the last arrival lands exactly at ``n / rate``:
a finite sample of random gaps would otherwise miss the asked rate by a few percent,
and the point of a sweep is to compare configurations at the rate that was asked.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Seconds after the start at which each request is sent (non-decreasing)."""
    if num_requests < 0:
        raise ValueError("num_requests must be >= 0")
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0 (use inf to send everything at once)")
    if num_requests == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    target_end = num_requests / request_rate
    times *= target_end / times[-1]
    return times.tolist()


def achieved_rate(times: list[float]) -> float:
    """Requests per second over a schedule or a list of actual send offsets from the start."""
    if not times or times[-1] <= 0:
        return math.inf
    return len(times) / times[-1]


def parse_rate(text: str) -> float:
    """'inf' or a positive number of requests per second."""
    value = float(text)
    if value <= 0 or math.isnan(value):
        raise ValueError(f"request rate must be positive or inf, got {text!r}")
    return value
