"""Every flag of every command explains itself in --help (the project's standard), and
`attnserve bench attention --op OP --help` reaches that benchmark's own flags."""

from __future__ import annotations

import argparse

import pytest

from bench.attention import cli as bench_cli
from bench.attention import decode as decode_bench
from bench.attention import linear as linear_bench
from bench.attention import prefill as prefill_bench
from bench.attention import rope_store as rope_store_bench
from loadtest.cli import build_parser as loadtest_parsers
from server.cli import build_parser as server_parser
from server.router.cli import build_parser as router_parser


def _walk(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def _parsers():
    yield from _walk(server_parser(), "attnserve")
    yield "attnserve router", router_parser()
    run, sweep = loadtest_parsers()
    yield from _walk(run, "loadtest run")
    yield from _walk(sweep, "loadtest sweep")
    yield "bench attention --op decode", decode_bench.build_parser()
    prefill = argparse.ArgumentParser()
    prefill_bench.add_arguments(prefill)
    yield "bench attention --op prefill", prefill
    yield "bench attention --op rope_store", rope_store_bench.build_parser()
    for op in ("linear-decode", "linear-prefill"):
        yield f"bench attention --op {op}", linear_bench.build_parser(op)


def test_every_option_has_help_text() -> None:
    missing = []
    for path, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "flags without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("op, flag", [("decode", "--shapes"), ("prefill", "--sweep-set"),
                                      ("extend", "--no-checks"),
                                      ("rope_store", "--layouts"),
                                      ("linear-prefill", "--snapshot-every")])
def test_bench_help_reaches_the_benchmark_parser(
    op: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--op", op, "--help"])
    assert exit_info.value.code == 0
    assert flag in capsys.readouterr().out


def test_bench_without_op_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli.main(["--help"]) == 0
    assert "--op" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main([])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flags, graphs", [([], True), (["--no-cuda-graphs"], False),
                                           (["--enforce-eager"], False)])
def test_enforce_eager_is_an_alias_of_no_cuda_graphs(flags: list[str], graphs: bool) -> None:
    from server.engine.args import engine_config_from_args

    args = server_parser().parse_args(["serve", *flags])
    assert engine_config_from_args(args).cuda_graphs is graphs
