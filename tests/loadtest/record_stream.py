"""Record streamed responses line by line, each line with its arrival time, as a fixture.

    python -m tests.loadtest.record_stream --base-url URL --endpoint completions \\
        --requests 6 --stagger-s 0.35 --prompt-len 24 --max-tokens 20 --out FILE.json

With ``--scripted FLAVOR`` instead of ``--base-url``, the stream comes from the scripted
server (tests/loadtest/scripted_server.py) started in this process with the flavor's
stream format and the timing flags below. The JSON holds, per request, when its clock
started and every line of the response (SSE events, blank separators, ``[DONE]``) with the
``perf_counter`` time it arrived, relative to the first request's start; and the run's
duration (first start to last response end), so a test can replay the requests through
metric definitions without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest.protocols import ENDPOINT_PATHS, SamplingOptions, build_body
from loadtest.workloads import Turn
from tests.loadtest.scripted_server import FLAVORS, Script, ScriptedSSEServer


async def _record_one(client: httpx.AsyncClient, endpoint: str, body: dict[str, Any],
                      delay_s: float, origin: float) -> dict[str, Any]:
    await asyncio.sleep(delay_s)
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    async with client.stream("POST", ENDPOINT_PATHS[endpoint], json=body) as response:
        async for line in response.aiter_lines():
            lines.append((time.perf_counter() - origin, line))
    return {"start": start - origin, "status": response.status_code,
            "expected_prompt_len": len(body.get("prompt") or body.get("input_ids") or []),
            "lines": lines, "end": time.perf_counter() - origin}


async def record(base_url: str, endpoint: str, requests: int, stagger_s: float,
                 prompt_len: int, max_tokens: int) -> dict[str, Any]:
    sampling = SamplingOptions()
    bodies = []
    for i in range(requests):
        ids = [1000 + 7 * i + j for j in range(prompt_len)]
        turn = Turn(max_tokens, prompt_len, token_ids=None if endpoint == "chat" else ids,
                    text=" ".join(f"w{t}" for t in ids) if endpoint == "chat" else None)
        bodies.append(build_body(endpoint, "scripted-model", turn, [], sampling))
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as client:
        origin = time.perf_counter()
        recorded = await asyncio.gather(*(
            _record_one(client, endpoint, body, i * stagger_s, origin)
            for i, body in enumerate(bodies)))
    first = min(r["start"] for r in recorded)
    return {"endpoint": endpoint, "base_url": base_url,
            "duration": max(r["end"] for r in recorded) - first, "requests": recorded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url")
    where.add_argument("--scripted", choices=FLAVORS,
                       help="record from the scripted server with this stream format")
    parser.add_argument("--endpoint", choices=list(ENDPOINT_PATHS), default="completions")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--stagger-s", type=float, default=0.35)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--ttft-ms", type=float, default=150.0)
    parser.add_argument("--itl-ms", type=float, nargs="+", default=[60.0])
    parser.add_argument("--empty-text-tokens", type=int, nargs="*", default=[])
    parser.add_argument("--done-delay-ms", type=float, default=0.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gaps = [args.itl_ms[i % len(args.itl_ms)] / 1000 for i in range(args.max_tokens - 1)]
    run = lambda url: asyncio.run(record(url, args.endpoint, args.requests,  # noqa: E731
                                         args.stagger_s, args.prompt_len, args.max_tokens))
    if args.base_url:
        data = run(args.base_url)
    else:
        script = Script(ttft_s=args.ttft_ms / 1000, gaps_s=gaps, flavor=args.scripted,
                        empty_text_tokens=tuple(args.empty_text_tokens),
                        done_delay_s=args.done_delay_ms / 1000, fail_every=args.fail_every)
        with ScriptedSSEServer(script) as server:
            data = run(server.base_url)
        data["base_url"] = f"scripted server, flavor {args.scripted}"
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
