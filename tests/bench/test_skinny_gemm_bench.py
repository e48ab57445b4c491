"""bench/skinny_gemm.py off the GPU: the model's projection shapes, the sweep run end to end
on a tiny shape under the interpreter (every candidate checked against F.linear), the step
sums and the TUNED lines it prints."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402

from bench.skinny_gemm import (  # noqa: E402
    GemmRow,
    Projection,
    format_table,
    measure,
    neighbours,
    projections,
    step_sums,
    sweep_tiles,
    tuned_lines,
)
from model.loader import peek_model_config  # noqa: E402
from model.skinny_gemm import SkinnyConfig, launch_shape, row_block  # noqa: E402


def test_llama3_8b_projections():
    shapes = {p.op: (p.n, p.k, p.per_step) for p in projections(peek_model_config("llama3-8b"))}
    assert shapes == {"qkv": (6144, 4096, 32), "o": (4096, 4096, 32),
                      "gate_up": (28672, 4096, 32), "down": (4096, 14336, 32),
                      "lm_head": (128256, 4096, 1)}


def test_sweep_candidates_are_valid():
    for m in (1, 3, 8, 16, 64):
        tiles = sweep_tiles(m)
        assert all(row_block(m, False) * bn * bk <= 8192 for bn, bk, dot in tiles if not dot)
        assert any(dot for *_, dot in tiles) and (m > 8) == all(dot for *_, dot in tiles)
    best = SkinnyConfig(32, 128, 2, True, 4, 4)
    around = neighbours(best, 4096)
    assert best not in around and len(set(around)) == len(around)
    assert {c.split_k for c in around} == {1, 2, 4, 8}
    assert all(launch_shape(4096, c)[1] == c.split_k for c in around)
    assert {c.split_k for c in neighbours(best, 300)} == {1, 2}  # 3 K-tiles: no 4 or 8 splits


def test_measure_sweeps_a_tiny_projection_under_the_interpreter():
    proj = Projection("down", 40, 96, 3)
    rows = measure(proj, [1, 16], torch.bfloat16, torch.device("cpu"), gbps=100.0,
                   sweep=True, iters=1)
    assert [r.rows for r in rows] == [1, 16]
    for r in rows:
        assert r.wrong_configs == []
        assert r.best is not None and r.best_us == min(r.best_us, r.default_us)
        assert r.bytes == (40 * 96 + r.rows * 96 + r.rows * 40) * 2
        assert r.torch_us > 0 and r.best_us > 0


def _row(op: str, m: int, n: int, k: int, per_step: int, torch_us: float,
         best_us: float) -> GemmRow:
    best = SkinnyConfig(16, 256, 1, False, 4, 3)
    return GemmRow(op, m, n, k, per_step, 0, torch_us, best_us + 1, "d", best_us, best.label(),
                   0.8, 0.9, 0.95, [], best)


def test_step_sums_and_tuned_lines():
    rows = [_row("o", 1, 1000, 500, 4, 10.0, 8.0), _row("lm_head", 1, 2000, 500, 1, 5.0, 6.0)]
    (s,) = step_sums(rows, gbps=1000.0, dtype=torch.bfloat16)
    weight_bytes = (4 * 1000 * 500 + 2000 * 500) * 2
    assert s["weight_bytes"] == weight_bytes
    assert abs(s["floor_ms"] - 1e3 * weight_bytes / 1e12) < 1e-4
    assert abs(s["torch_ms"] - (40 + 5) / 1e3) < 1e-9
    assert abs(s["best_ms"] - (32 + 6) / 1e3) < 1e-9
    assert abs(s["best_of_both_ms"] - (32 + 5) / 1e3) < 1e-9
    lines = tuned_lines(rows)
    table = eval("{\n" + "\n".join(lines) + "\n}", {"SkinnyConfig": SkinnyConfig})  # noqa: S307
    assert table[(1, 1000, 500)] == rows[0].best
    text = format_table(rows, [s])
    assert "| o | 1 | 1000 x 500 | 10.0 (0.80) | 9.0 (0.90) | 8.0 (0.95) |" in text
    assert f"| 1 | {s['floor_ms']:.3f} | 0.045 (" in text
