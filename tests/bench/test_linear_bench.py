"""The lightning-attention benchmark's plumbing on the CPU under the Triton interpreter at
tiny shapes (timers replaced): every config row is checked against the reference, the
summary picks the fastest, and a corrupted kernel is reported as a check failure."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.attention import linear  # noqa: E402
from bench.attention.common import DeviceCeilings  # noqa: E402

CEILINGS = DeviceCeilings(copy_gbps=1000.0, matmul_tflops=100.0)


@pytest.fixture
def fake_timers(monkeypatch):
    times = iter(range(100, 1, -1))  # each timed config is faster than the last

    def timer(fn, *args, **kwargs):
        fn()
        return float(next(times))

    monkeypatch.setattr(linear, "time_cuda_us", timer)
    monkeypatch.setattr(linear, "time_graph_us", timer)


def _args(op: str, *extra: str):
    return linear.build_parser(op).parse_args(
        ["--heads", "2", "--head-dim", "16", "--device", "cpu", "--no-peers", *extra])


def test_decode_rows_and_summary(fake_timers):
    args = _args("linear-decode")
    notes = linear.RunNotes()
    configs = linear._configs("linear-decode", "16,16,4;8,16,4")
    rows = linear.run_decode(args, 3, CEILINGS, torch.Generator().manual_seed(0), configs, notes)
    assert not notes.failures
    assert [r.backend for r in rows] == ["triton", "triton", "reference"]
    assert all(r.extra["check_rel_err"] < 1e-2 for r in rows[:2])  # bf16 outputs
    assert rows[0].gbps > 0 and rows[0].batch == 3
    (entry,) = linear.summarize("linear-decode", rows, CEILINGS)
    assert entry["config"]["block_v"] == 8  # the faster one
    assert entry["fraction_of_copy"] == round(rows[1].gbps / CEILINGS.copy_gbps, 3)
    assert entry["speedup_vs_reference"] == round(rows[2].time_us / rows[1].time_us, 3)
    assert "fraction_of_copy" in linear.format_summary("linear-decode", [entry])


def test_prefill_rows_with_snapshots(fake_timers):
    args = _args("linear-prefill", "--snapshot-every", "64")
    notes = linear.RunNotes()
    configs = linear._configs("linear-prefill", "16,16,4,1;32,8,4,1")
    rows = linear.run_prefill(args, "2x70x40", CEILINGS, torch.Generator().manual_seed(0),
                              configs, notes)
    assert not notes.failures, notes.failures
    assert [r.backend for r in rows] == ["triton"] * 3 + ["reference"]
    assert rows[2].extra["snapshot_every"] == 64
    assert rows[0].context == 110 and rows[0].new_tokens == 70
    (entry,) = linear.summarize("linear-prefill", rows, CEILINGS)
    assert entry["triton_us"] == rows[1].time_us  # the snapshot row is not a candidate
    assert "fraction_of_matmul" in linear.format_summary("linear-prefill", [entry])


def test_prefill_reports_a_wrong_kernel(fake_timers, monkeypatch):
    real = linear.lightning_extend

    def broken(*args, **kwargs):
        return real(*args, **kwargs) * 1.1

    monkeypatch.setattr(linear, "lightning_extend", broken)
    notes = linear.RunNotes()
    configs = linear._configs("linear-prefill", "16,16,4,1")
    linear.run_prefill(_args("linear-prefill", "--snapshot-every", "0"), "1x20",
                       CEILINGS, torch.Generator().manual_seed(0), configs, notes)
    assert len(notes.failures) == 1 and "triton extend" in notes.failures[0]
