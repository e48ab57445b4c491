"""Benchmarks and experiments: kernel benchmarks and their checks (`bench/attention/`),
model- and engine-level checks, offline throughput, CUDA graphs, the metrics' timing cost.

`bench` sits on top of the runtime packages and may import any of them; none of them imports
`bench`, except `attnserve bench ...` (`server/cli.py`), which imports `bench.cli` inside its
dispatch only (tests/test_import_graph.py holds the rule). Run JSON goes to `bench/results/`.
"""
