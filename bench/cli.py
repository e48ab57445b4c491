"""`attnserve bench WHAT ...`: the dispatch behind the server CLI's `bench` subcommand.

    attnserve bench throughput [flags]   attnserve vs transformers generate (bench.offline)
    attnserve bench prefix [flags]       the prefix cache on vs off (bench.offline)
    attnserve bench attention [flags]    kernel benchmarks on the GPU (bench.attention.cli)
    attnserve bench step [flags]         a decode step's parts against its floor (bench.step)

`server/cli.py` registers the subcommand (so `--help` needs no benchmark code) and calls
`main` from inside its dispatch; each benchmark module is imported only when chosen.
"""

from __future__ import annotations

WHAT = ("throughput", "prefix", "attention", "step")


def main(what: str, argv: list[str]) -> int:
    if what == "attention":
        from bench.attention.cli import main as attention_main

        return attention_main(argv)
    if what == "step":
        from bench.step import main as step_main

        return step_main(argv)
    from bench.offline import main as offline_main

    return offline_main(what, argv)
