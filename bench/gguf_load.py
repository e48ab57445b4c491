"""How long the embedded GGUF (SmolLM2-135M) takes to load: `python -m bench.gguf_load`.

Each run is a fresh Python process (what a server start pays: lazy imports of gguf and
transformers included, torch's own import excluded), timing `model.loader.load_model` on
the CPU in float32. Prints one JSON object: every run's seconds, their median, and the
parts the loader reports (`LoadedModel.timings`: weights and tokenizer, which overlap).
`--root DIR` times another checkout (e.g. an older commit unpacked with `git archive`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, time, torch
from model.loader import load_model
t0 = time.perf_counter()
loaded = load_model(None, torch.float32, torch.device("cpu"))
total = time.perf_counter() - t0
print(json.dumps({"load_s": total, **getattr(loaded, "timings", {})}))
"""


def one_load(root: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _CHILD], cwd=root, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the load failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(root: Path, runs: int) -> dict[str, object]:
    results = [one_load(root) for _ in range(runs)]
    keys = sorted({k for r in results for k in r})
    return {
        "runs": results,
        "median": {k: statistics.median(r[k] for r in results if k in r) for k in keys},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="fresh-process loads to time")
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose model.loader is timed")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    args = ap.parse_args(argv)
    result = {
        "benchmark": "gguf_load", "model": "SmolLM2-135M-Instruct (embedded GGUF, Q4_1)",
        "device": "cpu", "dtype": "float32", "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0], "machine": platform.machine(),
        "root": args.root, **measure(Path(args.root), args.runs),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
