"""(a) Against a server that streams at scripted times, the client's TTFT/ITL/TPOT/E2E match.

The scripted server writes the first token's event ``ttft`` after a request arrives, then
one per gap, then, ``done_delay`` later, the usage event and ``[DONE]``; it records when it
actually wrote each token's event: those times, taken from the instant the client started
its clock, are the known values. Gaps are distinct by 10 ms, so an event timed against the
wrong neighbour misses by at least 10 ms, and an E2E that ran to ``[DONE]`` misses by
``done_delay`` (25 ms or more), far outside the 2 ms tolerance. The median error over
several sequential requests is compared, so one scheduler hiccup on a busy 2-core machine
does not decide it. Each endpoint is spoken as attnserve streams it and as its peer does
(vLLM's OpenAI server, with an empty-text token and a role-only chat event; SGLang's
/generate, whose events carry the whole text so far).
"""

from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest

from loadtest.runner import RunConfig, run_benchmark
from loadtest.workloads import WorkloadOptions, build_trace
from tests.loadtest.scripted_server import Script, ScriptedSSEServer

TOLERANCE_MS = 2.0
NUM_REQUESTS = 9


def _median_error(measured: list[float], known: list[float]) -> float:
    return statistics.median(abs(m - k) for m, k in zip(measured, known, strict=True))


@pytest.mark.parametrize(("endpoint", "flavor"), [
    ("completions", "attnserve"), ("completions", "vllm"), ("chat", "attnserve"),
    ("chat", "vllm"), ("generate", "attnserve"), ("sglang", "sglang"),
])
def test_streamed_timings_equal_the_known_times(endpoint: str, flavor: str) -> None:
    rng = np.random.default_rng()
    gaps = rng.permutation([0.008, 0.018, 0.028, 0.038])[: int(rng.integers(3, 5))]
    num_tokens = len(gaps) + 1
    # vLLM sends an event for a token without text (a special token) too.
    empty = (int(rng.integers(1, num_tokens)),) if flavor == "vllm" else ()
    script = Script(ttft_s=float(rng.uniform(0.03, 0.07)), gaps_s=[float(g) for g in gaps],
                    done_delay_s=float(rng.uniform(0.025, 0.04)), flavor=flavor,
                    empty_text_tokens=empty)
    use_ids = endpoint != "chat"
    options = WorkloadOptions(num_prompts=NUM_REQUESTS, input_len=int(rng.integers(5, 40)),
                              output_len=num_tokens, seed=int(rng.integers(1 << 30)),
                              use_token_ids=use_ids)
    warmup = build_trace(WorkloadOptions(num_prompts=1, input_len=4, output_len=num_tokens,
                                         use_token_ids=use_ids))
    with ScriptedSSEServer(script) as server:
        # One request at a time on a warm connection: no connection set-up inside TTFT.
        cfg = RunConfig(base_url=server.base_url, endpoint=endpoint, max_concurrency=1,
                        show_progress=False, save_detailed=True)
        result = asyncio.run(run_benchmark(cfg, build_trace(options), warmup))
        timelines = server.counters.timelines[1:]  # after the warm-up request

    assert result["completed"] == NUM_REQUESTS and result["failed"] == 0
    assert result["output_lens"] == [num_tokens] * NUM_REQUESTS
    text = "".join(f" w{i}" for i in range(num_tokens) if i not in empty)
    assert result["generated_texts"] == [text] * NUM_REQUESTS
    order = np.argsort(result["send_offsets"])  # sequential: send order = arrival order
    ms = lambda values: [values[i] * 1000 for i in order]  # noqa: E731
    ttfts, e2es = ms(result["ttfts"]), ms(result["latencies"])
    itls = [[g * 1000 for g in result["itls"][i]] for i in order]
    # The server thread shares the client's perf_counter clock, so its write times are the
    # known times, measured from the instant the client started each request's clock.
    starts = [result["start_times"][i] for i in order]
    pairs = list(zip(timelines, starts, strict=True))
    known_ttft = [(t.token_events[0] - s) * 1000 for t, s in pairs]
    known_e2e = [(t.token_events[-1] - s) * 1000 for t, s in pairs]
    known_itl = [np.diff(t.token_events) * 1000 for t in timelines]
    known_tpot = [(t.token_events[-1] - t.token_events[0]) / (num_tokens - 1) * 1000
                  for t in timelines]

    # The server kept to its script (else the comparison below would test little), and
    # the request reached it after the client's clock started.
    server_ttft = [(t.token_events[0] - t.arrived) * 1000 for t in timelines]
    assert statistics.median(server_ttft) == pytest.approx(script.ttft_s * 1000, abs=10)
    assert all(t.arrived > s for t, s in pairs)
    assert all(c >= k for c, k in zip(ttfts, server_ttft, strict=True))
    assert _median_error(ttfts, known_ttft) <= TOLERANCE_MS
    # E2E ends at the last token, not at [DONE] (done_delay later).
    assert _median_error(e2es, known_e2e) <= TOLERANCE_MS
    to_done = [(t.done - s) * 1000 for t, s in pairs]
    assert statistics.median(d - e for d, e in zip(to_done, e2es, strict=True)) \
        >= script.done_delay_s * 1000 - TOLERANCE_MS
    tpots = [(e - t) / (num_tokens - 1) for e, t in zip(e2es, ttfts, strict=True)]
    assert _median_error(tpots, known_tpot) <= TOLERANCE_MS
    assert all(len(gaps_ms) == len(script.gaps_s) for gaps_ms in itls)
    for position, gap in enumerate(script.gaps_s):
        measured = [gaps_ms[position] for gaps_ms in itls]
        known = [k[position] for k in known_itl]
        assert _median_error(measured, known) <= TOLERANCE_MS, f"gap {position}"
        assert statistics.median(measured) == pytest.approx(gap * 1000, abs=10)
    # The summary fields agree with the per-request values they summarize.
    assert result["median_ttft_ms"] == pytest.approx(statistics.median(ttfts))
    assert result["median_tpot_ms"] == pytest.approx(statistics.median(tpots))
    assert result["median_e2el_ms"] == pytest.approx(statistics.median(e2es))
    assert result["median_itl_ms"] == pytest.approx(statistics.median(sum(itls, [])))
    # Token totals come from the server's counts (usage, or the running counts).
    assert result["total_output_tokens"] == num_tokens * NUM_REQUESTS
    if endpoint != "chat":
        assert result["total_input_tokens"] == options.input_len * NUM_REQUESTS
    # Sequential requests of well under a second: the first second's bucket holds several
    # (the bucketed peaks are checked exactly in test_vllm_definitions.py).
    assert 1 <= result["max_concurrent_requests"] <= NUM_REQUESTS
    assert result["max_output_tokens_per_s"] >= num_tokens
