"""One benchmark run: warm-up, the trace on its precomputed schedule, metrics, the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from tqdm import tqdm

from loadtest.client import RequestResult, send_streaming_request
from loadtest.prefix_cache import ResetOutcome, reset_prefix_cache
from loadtest.protocols import SamplingOptions, build_body
from loadtest.schedule import achieved_rate, arrival_times
from loadtest.server_metrics import scrape, server_metrics_delta
from loadtest.stats import DEFAULT_PERCENTILES, per_request_details, summarize
from loadtest.workloads import Conversation, Trace, Turn

logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    base_url: str
    endpoint: str = "completions"
    model: str | None = None  # None: the first id of GET /v1/models, if any
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    metrics_path: str = "/metrics"
    show_progress: bool = True
    save_detailed: bool = False
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY' on every request
    # Empty the server's prefix cache after the warm-up, before the measured run.
    reset_prefix_cache: bool = False


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def resolve_model(client: httpx.AsyncClient) -> str | None:
    """The first model the server lists; None when it lists none (the field is then left out)."""
    try:
        response = await client.get("/v1/models", timeout=10.0)
        data = response.json().get("data") or []
        return str(data[0]["id"]) if response.status_code == 200 and data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


class _Dispatcher:
    """Sends conversations' turns with an optional cap on requests in flight."""

    def __init__(self, client: httpx.AsyncClient, cfg: RunConfig, model: str | None,
                 progress: tqdm | None) -> None:
        self.client, self.cfg, self.model, self.progress = client, cfg, model, progress
        self.limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.start = time.perf_counter()

    async def _one(self, conv: Conversation, index: int, turn: Turn,
                   history: list[tuple[Turn, str]]) -> RequestResult:
        body = build_body(self.cfg.endpoint, self.model, turn, history, self.cfg.sampling)
        async with self.limit if self.limit else contextlib.nullcontext():
            offset = time.perf_counter() - self.start
            result = await send_streaming_request(
                self.client, self.cfg.endpoint, body, turn.prompt_len)
        result.send_offset = offset
        result.conversation_id, result.turn_index = conv.conversation_id, index
        if self.progress is not None:
            self.progress.update(1)
        return result

    async def conversation(self, conv: Conversation) -> list[RequestResult]:
        """Turn by turn; a failed turn ends its conversation (later turns count as failed)."""
        results: list[RequestResult] = []
        history: list[tuple[Turn, str]] = []
        for index, turn in enumerate(conv.turns):
            result = await self._one(conv, index, turn, history)
            results.append(result)
            if not result.success:
                for skipped in range(index + 1, len(conv.turns)):
                    results.append(RequestResult(
                        error="not sent: an earlier turn of its conversation failed",
                        expected_prompt_len=conv.turns[skipped].prompt_len,
                        conversation_id=conv.conversation_id, turn_index=skipped))
                    if self.progress is not None:
                        self.progress.update(1)
                break
            history.append((turn, result.generated_text))
        return results

    async def replay(self, convs: list[Conversation], times: list[float]) -> list[RequestResult]:
        tasks = []
        self.start = time.perf_counter()
        for conv, at in zip(convs, times, strict=True):
            delay = self.start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.conversation(conv)))
        done = await asyncio.gather(*tasks)
        return [r for conv_results in done for r in conv_results]


def prefix_cache_fields(reset: ResetOutcome | None) -> dict[str, Any]:
    """``prefix_cache_cold``: True when the cache was emptied before the run, False when
    that was asked and failed, None when not asked (a sweep fills it in from what it knows
    of the server); ``prefix_cache_reset``: how the reset went."""
    return {
        "prefix_cache_cold": None if reset is None else reset.reset,
        "prefix_cache_cold_by": "reset" if reset is not None and reset.reset else None,
        "prefix_cache_reset": None if reset is None else reset.as_json(),
    }


async def run_benchmark(cfg: RunConfig, trace: Trace, warmup_trace: Trace | None = None
                        ) -> dict[str, Any]:
    """Replay ``trace`` against ``cfg.base_url`` and return the result dict (JSON-ready)."""
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=cfg.max_concurrency or None,
                          max_keepalive_connections=cfg.max_concurrency or None)
    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=timeout, limits=limits,
                                 headers=auth_headers(cfg.api_key)) as client:
        model = cfg.model or await resolve_model(client)
        warmup_failed = 0
        if warmup_trace is not None and warmup_trace.conversations:
            logger.info("warming up with %d requests", warmup_trace.num_requests)
            warm = _Dispatcher(client, cfg, model, None)
            warm_results = await warm.replay(warmup_trace.conversations,
                                             [0.0] * len(warmup_trace.conversations))
            warmup_failed = sum(not r.success for r in warm_results)
            if warmup_failed == len(warm_results):
                raise RuntimeError(f"every warm-up request failed: {warm_results[0].error}")
        reset = await reset_prefix_cache(client) if cfg.reset_prefix_cache else None
        before = await scrape(client, cfg.metrics_path)
        times = arrival_times(len(trace.conversations), cfg.request_rate, cfg.burstiness, cfg.seed)
        progress = tqdm(total=trace.num_requests, disable=not cfg.show_progress,
                        desc=f"rate {cfg.request_rate:g}", unit="req")
        dispatcher = _Dispatcher(client, cfg, model, progress)
        started = time.perf_counter()
        results = await dispatcher.replay(trace.conversations, times)
        duration = time.perf_counter() - started
        progress.close()
        after = await scrape(client, cfg.metrics_path)
    first_sends = sorted(r.send_offset for r in results if r.turn_index == 0)
    out: dict[str, Any] = {
        **trace.options.describe(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_url": cfg.base_url,
        "endpoint": cfg.endpoint,
        "model_id": model,
        "num_prompts": len(trace.conversations),
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "warmup_requests": 0 if warmup_trace is None else warmup_trace.num_requests,
        "warmup_failed": warmup_failed,
        "achieved_send_rate": None if math.isinf(cfg.request_rate) else achieved_rate(first_sends),
        "sampling": {"temperature": cfg.sampling.temperature,
                     "ignore_eos": cfg.sampling.ignore_eos},
        "workload_notes": trace.notes,
        **prefix_cache_fields(reset),
    }
    out.update(summarize(results, duration, cfg.percentiles, cfg.goodput_slos_ms))
    out["server_metrics"] = server_metrics_delta(before, after)
    if cfg.save_detailed:
        out.update(per_request_details(results))
    return out
