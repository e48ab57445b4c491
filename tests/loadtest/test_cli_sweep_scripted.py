"""The CLI: a run's JSON and summary, and a sweep that starts stand-in servers as processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import main
from tests.loadtest.scripted_server import Script, ScriptedSSEServer

SCRIPTED_SERVER = Path(__file__).with_name("scripted_server.py")


def test_run_writes_json_with_vllm_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "run.json"
    script = Script(ttft_s=0.01, gaps_s=[0.004], follow_max_tokens=True, fail_every=4,
                    step_split={"prefill": (2, 30.0, 6.0), "decode": (5, 10.0, 4.0)})
    with ScriptedSSEServer(script) as server:
        code = main(["--base-url", server.base_url, "--num-prompts", "8", "--input-len", "12",
                     "--output-len", "5", "--request-rate", "200", "--max-concurrency", "2",
                     "--goodput", "ttft:1000", "--output", str(out), "--disable-tqdm",
                     "--seed", str(int(np.random.default_rng().integers(1000)))])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 8 and result["model_id"] == "scripted-model"
    assert result["completed"] == 6 and result["failed"] == 2  # every 4th request fails
    assert result["error_samples"][0]["count"] == 2
    assert "scripted failure" in result["error_samples"][0]["error"]
    assert result["total_input_tokens"] == 6 * 12 and result["total_output_tokens"] == 6 * 5
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p95_e2el_ms",
                "request_throughput", "output_throughput", "request_goodput"):
        assert isinstance(result[key], float), key
    sm = result["server_metrics"]
    assert sm["available"] and sm["prompt_tokens"] == 6 * 12
    assert sm["generation_tokens"] == 6 * 5
    assert result["mean_ttft_ms"] >= sm["server_mean_ttft_ms"]
    # 6 requests finished (the failed ones add no step): 12 prefill and 30 decode steps.
    split = sm["step_time_by_phase"]
    assert split["prefill"] == {"steps": 12, "mean_step_ms": pytest.approx(30.0),
                                "mean_attention_ms": pytest.approx(6.0),
                                "mean_non_attention_ms": pytest.approx(24.0),
                                "attention_share": pytest.approx(0.2)}
    assert split["decode"]["attention_share"] == pytest.approx(0.4)
    assert split["mixed"]["steps"] == 0 and split["mixed"]["attention_share"] is None
    assert sm["attention_share_of_step_time"] == pytest.approx((72 + 120) / (360 + 300))
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Mean TTFT (ms)" in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines()
            if line.split() and line.split()[0] in ("phase", "prefill", "decode", "mixed", "all")}
    assert rows["phase"] == ["steps", "step", "ms", "attn", "ms", "other", "ms", "attn", "%"]
    assert rows["prefill"] == ["12", "30.00", "6.00", "24.00", "20.0"]
    assert rows["decode"] == ["30", "10.00", "4.00", "6.00", "40.0"]
    assert rows["mixed"] == ["-"] * 5  # no mixed step in the run
    assert rows["all"][0] == "42" and rows["all"][4] == f"{100 * 192 / 660:.1f}"


def test_sweep_starts_each_configuration_and_writes_table_plots_json(tmp_path: Path) -> None:
    out_dir = tmp_path / "sweep"
    code = main([
        "sweep", "--server-command", f"{sys.executable} {SCRIPTED_SERVER}",
        "--server-config", "fast=--kv-layout nhd --ttft-ms 10",
        "--server-config", "slow=--kv-layout hnd --ttft-ms 110",
        "--server-args", "--itl-ms 3", "--request-rates", "50", "inf",
        "--num-prompts", "6", "--input-len", "10", "--output-len", "4", "--warmup", "1",
        "--output-dir", str(out_dir), "--disable-tqdm", "--startup-timeout", "30",
    ])
    assert code == 0
    runs = {(r["config_name"], str(r["request_rate"])): r
            for r in json.loads((out_dir / "sweep.json").read_text())}
    assert set(runs) == {("fast", "50.0"), ("fast", "inf"), ("slow", "50.0"), ("slow", "inf")}
    for name, layout in (("fast", "nhd"), ("slow", "hnd")):
        for rate in ("50", "inf"):
            run = json.loads((out_dir / f"{name}_rate-{rate}.json").read_text())
            assert run["completed"] == 6 and run["config_name"] == name
            assert run["server_metrics"]["server_config"]["kv_layout"] == [layout]
            assert "--kv-layout" in run["server_launch"]["args"]
            # One server per configuration: the second rate ran on a server used once before.
            assert run["server_launch"]["runs_served_before"] == (0 if rate == "50" else 1)
    # Each configuration's own server answered: the slow one's TTFT is ~100 ms longer.
    gap = runs[("slow", "50.0")]["median_ttft_ms"] - runs[("fast", "50.0")]["median_ttft_ms"]
    assert 60 < gap < 140
    table = (out_dir / "summary.md").read_text().splitlines()
    assert table[0].startswith("| config | rate |") and "TTFT p99 ms" in table[0]
    assert {row.split("|")[1].strip() for row in table[2:6]} == {"fast", "slow"}
    assert "| slow | `--itl-ms 3 --kv-layout hnd --ttft-ms 110` |" in table
    for png in ("ttft_vs_rate.png", "itl_vs_rate.png", "throughput_vs_latency.png"):
        data = (out_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def red_pixel_columns(png: Path) -> list[float]:
    """Horizontal positions (0..1) of the attention colour (matplotlib's C3) in the plot
    area, above the legend at the bottom."""
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    height, width = image.shape[:2]
    red = np.array([0xD6, 0x27, 0x28]) / 255
    mask = np.all(np.abs(image - red) < 0.02, axis=-1)
    mask[int(0.85 * height):] = False
    return list(np.nonzero(mask)[1] / width)


def test_sweep_reports_the_step_split_per_phase_and_draws_the_stacked_plot(tmp_path: Path
                                                                          ) -> None:
    """Stand-in servers whose step metrics are scripted: per request one prefill step and
    three decode steps, no mixed step, with known step and attention times."""
    out_dir = tmp_path / "sweep"
    code = main([
        "sweep", "--server-command", f"{sys.executable} {SCRIPTED_SERVER}",
        "--server-config", "fast=--step-split prefill=1:40:10 --step-split decode=3:8:2",
        "--server-config", "slow=--step-split prefill=1:80:40 --step-split decode=3:16:4",
        "--server-args", "--ttft-ms 5 --itl-ms 2", "--request-rates", "inf",
        "--num-prompts", "4", "--input-len", "6", "--output-len", "3", "--warmup", "1",
        "--output-dir", str(out_dir), "--disable-tqdm", "--startup-timeout", "30",
    ])
    assert code == 0
    runs = {r["config_name"]: r["server_metrics"]
            for r in json.loads((out_dir / "sweep.json").read_text())}
    # The warm-up request's steps fall before the run's first scrape: 4 + 12 steps.
    expected = {"fast": {"prefill": (40.0, 10.0), "decode": (8.0, 2.0)},
                "slow": {"prefill": (80.0, 40.0), "decode": (16.0, 4.0)}}
    for name, phases in expected.items():
        split = runs[name]["step_time_by_phase"]
        for phase, (step_ms, attention_ms) in phases.items():
            assert split[phase]["steps"] == (4 if phase == "prefill" else 12)
            assert split[phase]["mean_step_ms"] == pytest.approx(step_ms)
            assert split[phase]["mean_attention_ms"] == pytest.approx(attention_ms)
            assert split[phase]["mean_non_attention_ms"] == pytest.approx(step_ms - attention_ms)
            assert split[phase]["attention_share"] == pytest.approx(attention_ms / step_ms)
        assert split["mixed"]["steps"] == 0 and split["mixed"]["mean_step_ms"] is None
    assert runs["slow"]["attention_share_of_step_time"] == pytest.approx(208 / 512)
    assert runs["slow"]["step_time_all"]["mean_step_ms"] == pytest.approx(32.0)

    summary = (out_dir / "summary.md").read_text()
    table = summary.splitlines()
    header = [c.strip() for c in table[0].split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")] for r in table[2:4]}
    column = header.index
    assert rows["fast"][column("attn % p/d/m")] == "25.0/25.0/-"
    assert rows["slow"][column("attn % p/d/m")] == "50.0/25.0/-"
    assert rows["slow"][column("attn ms p/d/m")] == "40.00/4.00/-"
    assert rows["slow"][column("step ms p/d/m")] == "80.00/16.00/-"
    assert rows["slow"][column("attn % all")] == "40.6"
    assert "| fast | inf | prefill | 4 | 40.00 | 10.00 | 30.00 | 25.0 |" in table
    assert "| slow | inf | decode | 12 | 16.00 | 4.00 | 12.00 | 25.0 |" in table
    assert "| slow | inf | mixed | - | - | - | - | - |" in table
    assert "`step_time_split.png`" in summary

    # The stacked plot: attention (red) in the prefill and decode panels, none in mixed.
    png = out_dir / "step_time_split.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    columns = red_pixel_columns(png)
    assert any(x < 0.33 for x in columns) and any(0.36 < x < 0.64 for x in columns)
    assert not any(x > 0.69 for x in columns)


def test_sweep_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    code = main(["sweep", "--server-command", f"{sys.executable} -c 'raise SystemExit(3)'",
                 "--server-config", "broken=", "--num-prompts", "1", "--disable-tqdm",
                 "--output-dir", str(tmp_path), "--startup-timeout", "20"])
    assert code == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "broken" in summary and "exited with code 3" in summary
    assert json.loads((tmp_path / "sweep.json").read_text()) == []


def test_configs_file_and_restart_per_rate(tmp_path: Path) -> None:
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([
        {"name": "as-dict", "args": {"kv_layout": "hnd", "ttft_ms": 5, "no_prefix_cache": True,
                                     "page_size": None}},
    ]))
    out_dir = tmp_path / "sweep"
    code = main(["sweep", "--server-command", f"{sys.executable} {SCRIPTED_SERVER}",
                 "--configs", str(configs), "--request-rates", "100", "inf", "--restart-per-rate",
                 "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
                 "--output-dir", str(out_dir), "--disable-tqdm"])
    assert code == 0
    runs = json.loads((out_dir / "sweep.json").read_text())
    assert [r["request_rate"] for r in runs] == [100.0, "inf"]
    for run in runs:
        assert run["server_launch"]["args"] == ["--kv-layout", "hnd", "--ttft-ms", "5",
                                                "--no-prefix-cache"]
        assert run["server_launch"]["runs_served_before"] == 0  # a fresh server each rate
        assert run["server_metrics"]["server_config"]["kv_layout"] == ["hnd"]
    assert sorted(p.name for p in out_dir.glob("server_*.log")) == [
        "server_as-dict_rate-100.log", "server_as-dict_rate-inf.log"]


def test_shipped_configuration_lists_parse_into_server_flags() -> None:
    from loadtest.sweep import load_server_configs
    from server.cli import build_parser  # the test may import the server; loadtest may not

    serve_parser = build_parser()
    folder = Path(__file__).parents[2] / "loadtest" / "sweeps"
    files = sorted(folder.glob("*.json"))
    assert files
    for path in files:
        configs = load_server_configs(str(path))
        assert len({c.name for c in configs}) == len(configs) > 0
        for config in configs:
            assert "--kv-layout" in config.args
            flags = [a for a in config.args if a.startswith("--")]  # on/off flags take no value
            assert config.args[0].startswith("--") and len(set(flags)) == len(flags)
            # The server's own parser accepts them (it exits on an unknown flag or value).
            parsed = serve_parser.parse_args(["serve", *config.args])
            assert parsed.kv_layout == config.args[config.args.index("--kv-layout") + 1]
