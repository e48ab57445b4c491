"""Issue 2 (e): the CLI answers a factual question with the real model."""

import json
import subprocess
import sys


def test_generate_cli_knows_the_capital_of_france() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--log-level", "warning", "generate",
         "What is the capital of France?", "--max-tokens", "24", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["token_ids"]
