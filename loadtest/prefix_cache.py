"""Emptying the server's prefix cache between runs, so each run starts cold.

``POST /reset_prefix_cache`` is vLLM's endpoint and attnserve's; ``POST /flush_cache`` is
SGLang's, tried when the first is missing. 200 means the cache was emptied (unless the JSON
answer says ``"success": false``); 409 or 503 mean requests still hold cached pages, and the
reset is tried again after a short wait; 404 or 405 on both paths mean the server cannot do
it, and the caller decides what then (the sweep restarts the server instead).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)

RESET_PATHS = ("/reset_prefix_cache", "/flush_cache")
_MISSING = (404, 405)
_BUSY = (409, 503)


@dataclass
class ResetOutcome:
    status: str  # "reset" | "unsupported" | "failed"
    path: str | None = None
    detail: str = ""

    @property
    def reset(self) -> bool:
        return self.status == "reset"

    def as_json(self) -> dict[str, str | None]:
        return {"status": self.status, "path": self.path, "detail": self.detail}


def _refused(response: httpx.Response) -> bool:
    """A 200 whose JSON says the cache was not emptied."""
    try:
        data = response.json()
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("success") is False


async def reset_prefix_cache(client: httpx.AsyncClient, attempts: int = 5,
                             retry_wait_s: float = 0.5) -> ResetOutcome:
    """Ask the server behind ``client`` to empty its prefix cache."""
    for path in RESET_PATHS:
        for attempt in range(attempts):
            try:
                response = await client.post(path, timeout=60.0)
            except httpx.HTTPError as exc:
                return ResetOutcome("failed", path, f"{type(exc).__name__}: {exc}")
            detail = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code in _MISSING:
                break
            if response.status_code == 200 and not _refused(response):
                logger.info("prefix cache emptied (POST %s)", path)
                return ResetOutcome("reset", path, response.text[:300])
            if (response.status_code in _BUSY or response.status_code == 200) \
                    and attempt + 1 < attempts:
                await asyncio.sleep(retry_wait_s)  # requests still hold pages: wait for them
                continue
            return ResetOutcome("failed", path, detail)
    return ResetOutcome("unsupported", None, "the server has neither POST "
                        + " nor POST ".join(RESET_PATHS))
