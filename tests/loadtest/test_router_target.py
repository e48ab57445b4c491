"""The load generator against a router: the workers' metrics from the router's
/engine_metrics (when it has no /metrics), summed and per replica; the per-replica table;
the prefix-cache plot of the policies; text prompts for a text-routing router."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client import CollectorRegistry, Counter, generate_latest

from loadtest.cache_plot import prefix_cache_figure, write_prefix_cache_plot
from loadtest.cli import _traces, build_parser
from loadtest.report import replicas_markdown
from loadtest.server_metrics import MetricsSnapshot, scrape, server_metrics_delta

ENGINE = {"model_name": "m", "attention_backend": "reference", "kv_layout": "nhd",
          "page_size": "16", "attention_variant": "softmax"}


def worker_exposition(replica: str, queries: int, hits: int, requests: int) -> str:
    reg = CollectorRegistry()
    names = [*ENGINE, "replica"]
    for name, value in (("prefix_cache_queries", queries), ("prefix_cache_hits", hits),
                        ("request_success", requests), ("prompt_tokens", queries)):
        Counter(f"attnserve_{name}", "", names, registry=reg).labels(
            **ENGINE, replica=replica).inc(value)
    return generate_latest(reg).decode()


def router_exposition(counts: dict[str, tuple[int, int, int]]) -> str:
    """What SGLang's router's /engine_metrics answers: each worker's exposition with a
    worker_addr label added to every sample."""
    lines = []
    for i, (replica, (q, h, r)) in enumerate(counts.items()):
        for line in worker_exposition(replica, q, h, r).splitlines():
            if line.startswith("attnserve_") and "{" in line:
                line = line.replace("{", f'{{worker_addr="http://127.0.0.1:900{i}",', 1)
            elif line.startswith("#") and i > 0:
                continue  # one HELP/TYPE per family
            lines.append(line)
    return "\n".join(lines) + "\n"


def test_per_replica_and_pooled_counters_from_the_routers_engine_metrics() -> None:
    before = MetricsSnapshot.parse(router_exposition({"replica-0": (100, 10, 2),
                                                      "replica-1": (50, 0, 1)}))
    after = MetricsSnapshot.parse(router_exposition({"replica-0": (500, 310, 6),
                                                     "replica-1": (450, 100, 5)}))
    out = server_metrics_delta(before, after)
    assert out["prefix_cache_queries"] == 800 and out["prefix_cache_hits"] == 400
    assert out["prefix_cache_hit_rate"] == 0.5
    assert out["replicas"] == {
        "replica-0": {"requests": 4, "prompt_tokens": 400, "generation_tokens": None,
                      "prefix_cache_queries": 400, "prefix_cache_hits": 300,
                      "prefix_cache_hit_rate": 0.75},
        "replica-1": {"requests": 4, "prompt_tokens": 400, "generation_tokens": None,
                      "prefix_cache_queries": 400, "prefix_cache_hits": 100,
                      "prefix_cache_hit_rate": 0.25}}
    table = replicas_markdown([{"config_name": "cache_aware", "request_rate": 2.0,
                                "server_metrics": out}])
    assert "| cache_aware | 2.00 | replica-0 | 4 | 400 | 0.750 |" in table
    # A single server has no replicas: no table.
    single = MetricsSnapshot.parse(worker_exposition("x", 1, 1, 1).replace(',replica="x"', ""))
    assert server_metrics_delta(single, single)["replicas"] == {}
    assert replicas_markdown([{"server_metrics": {"replicas": {}}}]) == ""


def test_scrape_falls_back_to_the_routers_engine_metrics() -> None:
    body = router_exposition({"replica-0": (10, 5, 1)})
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/engine_metrics":
            return httpx.Response(200, text=body)
        return httpx.Response(404)

    async def run() -> MetricsSnapshot | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url="http://router") as client:
            return await scrape(client)

    snapshot = asyncio.run(run())
    assert seen == ["/metrics", "/engine_metrics"]
    assert snapshot is not None
    assert snapshot.total("attnserve_prefix_cache_hits_total") == 5


def _run(config: str, rate: float, hit_rate: float, ttft: float) -> dict:
    return {"config_name": config, "request_rate": rate, "median_ttft_ms": ttft,
            "output_throughput": 10.0 * hit_rate, "model_id": "m",
            "workload": "shared-prefix", "server_metrics": {"prefix_cache_hit_rate": hit_rate}}


def test_prefix_cache_plot_puts_the_policies_side_by_side(tmp_path) -> None:
    runs = [_run("round_robin", 1.0, 0.3, 900.0), _run("cache_aware", 1.0, 0.6, 500.0),
            _run("round_robin", float("inf"), 0.35, 2000.0),
            _run("cache_aware", float("inf"), 0.7, 1200.0)]
    fig = prefix_cache_figure(runs)
    hit_axes, ttft_axes, _ = fig.axes[:3]
    heights = sorted(round(p.get_height(), 2) for p in hit_axes.patches)
    assert heights == [0.3, 0.35, 0.6, 0.7]
    assert sorted(p.get_height() for p in ttft_axes.patches) == [500.0, 900.0, 1200.0, 2000.0]
    assert [t.get_text() for t in hit_axes.get_xticklabels()] == ["1/s", "all at once"]
    assert write_prefix_cache_plot(runs, tmp_path).exists()
    no_cache = [{**r, "server_metrics": {}} for r in runs]
    assert write_prefix_cache_plot(no_cache, tmp_path / "none") is None


def test_text_prompts_for_completions() -> None:
    """A router that routes by text needs text: --text-prompts sends it to completions."""
    run, _ = build_parser()
    common = ["--workload", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "2",
              "--system-prompt-len", "20", "--question-len", "4"]
    with_text, _ = _traces(run.parse_args([*common, "--text-prompts"]))
    with_ids, _ = _traces(run.parse_args(common))
    assert all(c.turns[0].text and c.turns[0].token_ids is None
               for c in with_text.conversations)
    assert all(c.turns[0].token_ids and c.turns[0].text is None
               for c in with_ids.conversations)
