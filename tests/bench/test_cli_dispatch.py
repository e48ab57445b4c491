"""`attnserve bench WHAT ...` reaches the benchmarks in `bench/` with the same subcommands."""

from __future__ import annotations

import argparse

import pytest

from bench import cli as bench_cli
from server.cli import build_parser, main


def test_the_server_parser_offers_what_bench_dispatches() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    what = next(a for a in sub.choices["bench"]._actions if a.dest == "what")
    assert tuple(what.choices) == bench_cli.WHAT


@pytest.mark.parametrize("what, flag", [("attention", "--op"), ("throughput", "--num-prompts"),
                                        ("prefix", "--num-groups"), ("step", "--context-lens")])
def test_bench_subcommands_reach_their_parsers(
    what: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["bench", what, "--help"])
    except SystemExit as exc:  # argparse's --help exits
        code = exc.code
    assert code == 0
    assert flag in capsys.readouterr().out
