"""--api-key (or $OPENAI_API_KEY) goes out as 'Authorization: Bearer KEY' on every request
the load generator makes, and never into the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.cli import main
from tests.loadtest.scripted_server import Script, ScriptedSSEServer

KEY = "sk-test-7f3a"


def _run(server: ScriptedSSEServer, out: Path, *flags: str) -> dict:
    code = main(["--base-url", server.base_url, "--num-prompts", "3", "--input-len", "4",
                 "--output-len", "2", "--disable-tqdm", "--reset-prefix-cache",
                 "--output", str(out), *flags])
    result = json.loads(out.read_text())
    assert code == (0 if result["completed"] else 1)
    return result


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_key_is_sent_on_every_request(how: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY if how == "env" else "sk-wrong")
    flags = ("--api-key", KEY) if how == "flag" else ()  # the flag wins over the variable
    out = tmp_path / "run.json"
    with ScriptedSSEServer(Script(ttft_s=0.002, gaps_s=[0.001], api_key=KEY)) as server:
        result = _run(server, out, *flags)
        seen = server.counters.seen
    assert result["completed"] == 3 and result["model_id"] == "scripted-model"
    assert result["prefix_cache_cold"] is True  # the reset was authorised too
    paths = {path for _, path, _ in seen}
    assert {"/v1/models", "/v1/completions", "/reset_prefix_cache", "/metrics"} <= paths
    assert {auth for _, _, auth in seen} == {f"Bearer {KEY}"}
    assert KEY not in out.read_text()


def test_without_the_key_every_request_is_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedSSEServer(Script(ttft_s=0.002, gaps_s=[0.001], api_key=KEY)) as server:
        result = _run(server, tmp_path / "run.json")
        seen = server.counters.seen
    assert result["completed"] == 0 and result["failed"] == 3
    assert "HTTP 401" in result["error_samples"][0]["error"]
    assert result["prefix_cache_cold"] is False
    assert result["prefix_cache_reset"]["detail"].startswith("HTTP 401")
    assert {auth for _, _, auth in seen} == {None}
