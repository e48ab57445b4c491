"""loadtest is a plain client: importing all of it pulls in no server, model or torch code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import loadtest

FORBIDDEN = ("torch", "server", "scheduler", "model", "attention", "kvcache")


def test_loadtest_imports_no_server_side_package() -> None:
    modules = sorted(p.stem for p in Path(loadtest.__file__).parent.glob("*.py")
                     if p.stem != "__main__")
    assert {"cli", "client", "runner", "sweep", "stats"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module('loadtest.' + m)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(loadtest.__file__).parent.parent)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "httpx" in loaded and "loadtest" in loaded
    assert not loaded & set(FORBIDDEN), loaded & set(FORBIDDEN)
