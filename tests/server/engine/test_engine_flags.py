"""Issue 20 (2): the flags users reach for, spelled as vLLM spells them; --help shows every
default; start-up errors (a Hub id, a bad path, a busy port, a bad host, ...) are one line
and exit status 2, before anything loads."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli import HelpFormatter, build_parser, main
from server.engine.args import engine_config_from_args
from tests.server.engine_fixtures import make_llm, smollm2


def _config(*flags: str):
    return engine_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_vllm_spellings_are_aliases() -> None:
    default = _config()
    assert default.enable_prefix_cache and default.seed == 0 and default.log_stats
    assert _config("--block-size", "32").page_size == 32
    assert _config("--page-size", "32").page_size == 32
    for off in ("--no-enable-prefix-caching", "--no-prefix-cache"):
        assert _config(off).enable_prefix_cache is False
    assert _config("--enable-prefix-caching").enable_prefix_cache is True
    assert _config("--seed", "7").seed == 7 == _config("--weights-seed", "7").seed
    assert _config("--disable-log-stats").log_stats is False
    assert _config("--disable-log-requests").disable_log_requests is True
    assert _config("--enable-chunked-prefill").max_num_batched_tokens == 2048
    with pytest.raises(ValueError, match="always chunks prefill"):
        _config("--no-enable-chunked-prefill")


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_shows_every_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cmd = sub.choices[command]
    formatter = HelpFormatter(command)
    missing = [a.option_strings[0] for a in _options(cmd)
               if "default" not in (formatter._get_help_string(a) or "").lower()]
    assert not missing, f"{command} --help shows no default for {missing}"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default: 16)" in text and "(default: on)" in text


def test_chat_template_file_or_string(tmp_path: Path) -> None:
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert _config("--chat-template", str(path)).resolved_chat_template() == template
    assert _config("--chat-template", template).resolved_chat_template() == template
    with pytest.raises(ValueError, match="no such file, and not a Jinja template"):
        _config("--chat-template", "missing.jinja").resolved_chat_template()
    llm = make_llm(chat_template=template)
    tok = llm.engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<<hi>>"
    own = smollm2().tokenizer  # the shared tokenizer keeps its own template
    assert own.decode(own.apply_chat_template([{"role": "user", "content": "hi"}])) != "<<hi>>"


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnserve: error: ") and expected in err[0], err


@pytest.mark.parametrize("flags, expected", [
    (["--model", "meta-llama/Llama-3-8B"], "looks like a Hugging Face Hub id"),
    (["--model", "/no/such/model.gguf"], "no such file or folder"),
    (["--model", "synthetic:nope"], "unknown synthetic preset"),
    (["--tokenizer", "/no/such/tokenizer"], "neither a tokenizer folder nor a .gguf file"),
    (["--chat-template", "missing.jinja"], "not a Jinja template"),
    (["--no-enable-chunked-prefill"], "always chunks prefill"),
    pytest.param(["--device", "cuda:0"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_unusable_engine_flags_fail_in_one_line(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    _one_line_error(capsys, ["serve", *flags], expected)


def test_busy_port_and_bad_host_fail_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line_error(capsys, ["serve", "--port", str(port)], "is already in use")
    _one_line_error(capsys, ["serve", "--host", "no-such-host.invalid"], "cannot resolve")
    _one_line_error(capsys, ["serve", "--host", "192.0.2.1"], "not an address of this machine")
    _one_line_error(capsys, ["serve", "--port", "70000"], "ports are 0-65535")


def test_hub_id_as_a_process_exits_2_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "serve", "--model",
                           "meta-llama/Llama-3-8B"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "Hugging Face Hub id" in proc.stderr
