"""Row-by-row comparison of two kernel benchmark runs (`bench attention` JSON files).

    python -m bench.compare_runs OLD.json NEW.json [--tolerance 0.05] [--json-out FILE]

Rows are matched by what they measure (op, backend, layout, page size, variant, shape);
each matched row gets new time / old time. Peers (SDPA, cuDNN, Flex) are compared too: they
did not change, so their spread is the run-to-run noise against which the project's own
kernels' ratios are read. Exits 1 when a row of the project's kernels is outside the
tolerance and the peers are inside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

KEY_FIELDS = ("op", "backend", "layout", "page_size", "variant", "batch", "context", "new_tokens")
OWN_BACKENDS = frozenset({"triton"})


def row_key(row: dict) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS)


def compare(old: dict, new: dict) -> list[dict]:
    """One entry per row present in both runs, in the new run's order."""
    before = {row_key(r): r for r in old["rows"]}
    out = []
    for row in new["rows"]:
        prev = before.get(row_key(row))
        if prev is None or not prev.get("time_us") or not row.get("time_us"):
            continue
        out.append({**{f: row.get(f) for f in KEY_FIELDS}, "old_us": prev["time_us"],
                    "new_us": row["time_us"], "ratio": row["time_us"] / prev["time_us"]})
    return out


def summary(rows: list[dict], tolerance: float) -> dict:
    own = [r for r in rows if r["backend"] in OWN_BACKENDS]
    peers = [r for r in rows if r["backend"] not in OWN_BACKENDS]

    def spread(rs: list[dict]) -> dict:
        if not rs:
            return {"rows": 0}
        ratios = [r["ratio"] for r in rs]
        return {"rows": len(rs), "median": statistics.median(ratios), "min": min(ratios),
                "max": max(ratios),
                "outside": sum(abs(x - 1) > tolerance for x in ratios)}

    return {"tolerance": tolerance, "own": spread(own), "peers": spread(peers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    old, new = (json.loads(Path(f).read_text()) for f in (args.old, args.new))
    rows = compare(old, new)
    result = {"old": args.old, "new": args.new, "old_device": old.get("device"),
              "new_device": new.get("device"), "summary": summary(rows, args.tolerance),
              "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    for r in rows:
        flag = "" if abs(r["ratio"] - 1) <= args.tolerance else "  <-- outside"
        print(f"{r['op']:<8} {r['backend']:<10} {r['layout']:<10} {r['page_size']!s:>3} "
              f"{r['variant']:<20} {r['batch']!s:>4}x{r['context']!s:<6} "
              f"{r['old_us']:>9.1f} {r['new_us']:>9.1f} {r['ratio']:>6.3f}{flag}")
    print(json.dumps(result["summary"]))
    own = result["summary"]["own"]
    return 1 if own.get("outside") else 0


if __name__ == "__main__":
    sys.exit(main())
