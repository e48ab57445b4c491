"""(c) A small sweep against the real attnserve on CPU with the embedded SmolLM2.

Two configurations (KV layout nhd and hnd), one rate, a few short requests each: the sweep
starts each server on a free loopback port, waits for /health, replays the same trace,
stops it, and writes the table, the plots and one JSON per run. The client's numbers are
checked against the server's own /metrics over the same run. This test needs the server:
when it cannot start, the test fails (it is never skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import main

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 12, 3
SERVER_ARGS = "--max-model-len 64 --kv-cache-tokens 512 --max-num-seqs 4 --log-level warning"


@pytest.mark.timeout(600)
def test_small_sweep_against_attnserve(tmp_path: Path) -> None:
    out_dir = tmp_path / "sweep"
    seed = int(np.random.default_rng().integers(1 << 20))
    code = main([
        "sweep", "--server-config", "nhd=--kv-layout nhd", "--server-config", "hnd=--kv-layout hnd",
        "--server-args", SERVER_ARGS, "--request-rates", "8",
        "--endpoint", "completions", "--workload", "random", "--num-prompts", str(NUM_PROMPTS),
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--seed", str(seed),
        "--output-dir", str(out_dir), "--disable-tqdm", "--startup-timeout", "300",
        "--request-timeout", "240", "--log-level", "warning",
    ])
    summary = (out_dir / "summary.md").read_text()
    logs = {p.name: p.read_text()[-2000:] for p in out_dir.glob("server_*.log")}
    assert code == 0, f"sweep failed:\n{summary}\n{logs}"

    table = summary.splitlines()
    assert table[0].startswith("| config | rate |")
    assert [row.split("|")[1].strip() for row in table[2:4]] == ["nhd", "hnd"]
    header = [c.strip() for c in table[0].split("|")]
    for row in table[2:4]:
        shares = [c.strip() for c in row.split("|")][header.index("attn % p/d/m")].split("/")
        assert len(shares) == 3 and "-" not in shares[:2], row  # prefill and decode occurred
    for png in ("ttft_vs_rate.png", "itl_vs_rate.png", "throughput_vs_latency.png",
                "step_time_split.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"
        assert f"`{png}`" in summary

    for layout in ("nhd", "hnd"):
        run = json.loads((out_dir / f"{layout}_rate-8.json").read_text())
        server = run["server_metrics"]
        assert server["available"], "the server's /metrics could not be read"
        # The run started on a cold prefix cache: emptied by POST /reset_prefix_cache, or,
        # on a server without it, a fresh server.
        assert run["prefix_cache_cold"] is True
        assert run["prefix_cache_reset"]["status"] in ("reset", "unsupported")
        assert run["prefix_cache_cold_by"] == (
            "reset" if run["prefix_cache_reset"]["status"] == "reset" else "fresh server")
        assert server["server_config"]["kv_layout"] == [layout]
        # Everything sent came back, with exactly the asked lengths (token-id prompts,
        # ignore_eos), and the server counted the same tokens.
        assert run["completed"] == NUM_PROMPTS and run["failed"] == 0
        assert run["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
        assert run["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert server["prompt_tokens"] == run["total_input_tokens"]
        assert server["generation_tokens"] == run["total_output_tokens"]
        # The client sees the first token no sooner than the server produced it.
        assert server["server_ttft_count"] == NUM_PROMPTS
        assert run["mean_ttft_ms"] >= server["server_mean_ttft_ms"]
        for key in ("median_ttft_ms", "p99_itl_ms", "mean_tpot_ms", "mean_e2el_ms"):
            assert run[key] is not None and run[key] > 0, key
        # The step split: the first request's prompt is computed before anything decodes
        # (a prefill step), the last one's tokens after every prompt was in (decode steps);
        # mixed steps depend on the arrival times.
        split = server["step_time_by_phase"]
        assert split["prefill"]["steps"] >= 1 and split["decode"]["steps"] >= 1
        assert sum(s["steps"] for s in split.values()) == server["step_time_all"]["steps"]
        for phase, s in split.items():
            if s["steps"] == 0:
                assert s["attention_share"] is None, phase
                continue
            assert 0 < s["attention_share"] < 1, (phase, s)
            assert 0 < s["mean_attention_ms"] < s["mean_step_ms"], (phase, s)
            assert s["mean_non_attention_ms"] == pytest.approx(
                s["mean_step_ms"] - s["mean_attention_ms"])
        assert 0 < server["attention_share_of_step_time"] < 1
        assert server["kernel_builds"] == 0  # exported, and nothing builds on the CPU
