"""bench.compare_runs matches rows by what they measure and flags the project's own rows
that moved beyond the tolerance."""

from __future__ import annotations

import json

from bench.compare_runs import compare, main, summary


def _row(backend: str, layout: str, time_us: float, batch: int = 64) -> dict:
    return {"op": "decode", "backend": backend, "layout": layout, "page_size": 16,
            "variant": "softmax", "batch": batch, "context": 4096, "new_tokens": 1,
            "time_us": time_us}


def test_rows_match_by_what_they_measure(tmp_path) -> None:
    old = {"rows": [_row("triton", "nhd", 100.0), _row("sdpa_flash", "contiguous", 200.0),
                    _row("triton", "hnd", 50.0)]}
    new = {"rows": [_row("triton", "hnd", 56.0), _row("triton", "nhd", 101.0),
                    _row("sdpa_flash", "contiguous", 198.0), _row("triton", "nhd", 9.0, 1)]}
    rows = compare(old, new)
    assert [(r["layout"], round(r["ratio"], 3)) for r in rows] == [
        ("hnd", 1.12), ("nhd", 1.01), ("contiguous", 0.99)]
    s = summary(rows, 0.05)
    assert s["own"]["rows"] == 2 and s["own"]["outside"] == 1
    assert s["peers"]["rows"] == 1 and s["peers"]["outside"] == 0
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    new["rows"][0]["time_us"] = 51.0
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert main([str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--json-out",
                 str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["summary"]["own"]["outside"] == 0
