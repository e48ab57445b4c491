"""The dashboard files agree with each other and with what EngineMetrics exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.engine.metrics import EngineMetrics
from tests.server.engine.test_metrics_unit import parse_exposition

DASHBOARDS = Path(__file__).resolve().parents[3] / "dashboards"


def load_builder():
    spec = importlib.util.spec_from_file_location("build_grafana", DASHBOARDS / "build_grafana.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict:
    return json.loads((DASHBOARDS / "grafana.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_committed_json_is_what_the_builder_writes() -> None:
    assert (DASHBOARDS / "grafana.json").read_text() == load_builder().render(), (
        "run: python dashboards/build_grafana.py")


def test_dashboard_has_the_variables_and_panels_the_issue_asks_for() -> None:
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert {"model_name", "attention_backend", "kv_layout", "replica"} <= set(names)
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for needed in ("first token", "inter-token", "per output token", "end-to-end", "throughput",
                   "running and waiting", "kv cache usage", "prefix cache hit", "preemptions",
                   "step duration by phase", "attention share", "attention time per step",
                   "non-attention time per step", "tokens per step", "share of the requests",
                   "hit rate of the pool"):
        assert needed in titles, needed
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for var in ("$model_name", "$attention_backend", "$kv_layout", "$replica"):
                assert var in t["expr"], (p["title"], var)


def test_every_query_groups_and_every_legend_names_the_labels_that_tell_servers_apart() -> None:
    """The pool panels sum over the replicas: grouped and labelled by all but `replica`.
    Elsewhere a grouping without `replica` is only the pool total a replica's share is
    divided by (`ignoring(replica) group_left`)."""
    builder = load_builder()
    assert builder.SERIES_LABELS == ("model_name", "attention_backend", "kv_layout",
                                     "page_size", "attention_variant", "kv_cache_dtype",
                                     "tp_size", "replica")
    pool = set(builder.POOL_LABELS)
    assert pool == set(builder.SERIES_LABELS) - {"replica"}
    for p in dashboard()["panels"]:
        wanted = pool if p["title"] in builder.POOL_PANELS else set(builder.SERIES_LABELS)
        for t in p["targets"]:
            groupings = re.findall(r"\bby \(([^)]*)\)", t["expr"])
            assert groupings, (p["title"], t["expr"])
            for position, grouping in enumerate(groupings):
                names = {n.strip() for n in grouping.split(",")}
                divisor = position > 0 and "ignoring(replica) group_left" in t["expr"]
                assert (pool if divisor else wanted) <= names, (p["title"], grouping)
                assert ("replica" in names) == ("replica" in wanted and not divisor), (
                    p["title"], grouping)
            for label in wanted:
                assert "{{" + label + "}}" in t["legendFormat"], (p["title"], label)


def panel(title: str) -> dict:
    return next(p for p in dashboard()["panels"] if p["title"] == title)


def test_step_split_panels_divide_attention_by_the_time_of_all_steps_by_phase() -> None:
    builder = load_builder()
    assert not any("timed_step" in e for e in dashboard_exprs())  # the old denominator
    share = panel(builder.ATTENTION_SHARE_PANEL)
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"
    exprs = {t["legendFormat"].rsplit(" ", 1)[1]: t["expr"] for t in share["targets"]}
    assert set(exprs) == {"{{phase}}", "all"}
    for key, expr in exprs.items():
        numerator, denominator = expr.split(" / ")
        assert "rate(attnserve_attention_duration_seconds_sum{" in numerator
        assert "rate(attnserve_step_duration_seconds_sum{" in denominator
        assert ("phase" in numerator and "phase" in denominator) == (key == "{{phase}}")
    attention_ms = panel(builder.ATTENTION_MS_PANEL)["targets"]
    other_ms = panel(builder.NON_ATTENTION_MS_PANEL)["targets"]
    for targets, numerator in ((attention_ms, ["attention_duration_seconds_sum"]),
                               (other_ms, ["step_duration_seconds_sum",
                                           "attention_duration_seconds_sum"])):
        assert len(targets) == 1 and targets[0]["legendFormat"].endswith("{{phase}}")
        expr = targets[0]["expr"]
        assert expr.startswith("1000 * ")  # seconds to milliseconds
        assert re.findall(r"attnserve_(\w+)\{", expr) == [*numerator,
                                                           "step_duration_seconds_count"]
        assert all(", phase)" in g for g in re.findall(r"by \([^)]*\)", expr))
    for title in builder.STEP_SPLIT_PANELS[1:]:
        assert panel(title)["fieldConfig"]["defaults"]["unit"] == "ms"


def test_every_metric_in_the_dashboard_is_exported() -> None:
    metrics = EngineMetrics("m", "reference", "nhd", 16)
    exported = {name for name, _, _ in parse_exposition(metrics.render()[0])}
    used = {m for e in dashboard_exprs() for m in re.findall(r"attnserve_\w+", e)}
    for v in dashboard()["templating"]["list"]:
        used |= set(re.findall(r"attnserve_\w+", json.dumps(v.get("query", ""))))
    assert used and used <= exported, used - exported


def test_compose_mounts_and_provisioning_agree() -> None:
    compose = yaml.safe_load((DASHBOARDS / "compose.yaml").read_text())
    services = compose["services"]
    mounts: dict[str, str] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (DASHBOARDS / source).exists(), source
                mounts[target] = source
    provider = yaml.safe_load(
        (DASHBOARDS / "provisioning/dashboards/attnserve.yml").read_text())["providers"][0]
    dash_dir = provider["options"]["path"]
    assert any(t.startswith(dash_dir + "/") and s == "./grafana.json" for t, s in mounts.items())
    datasource = yaml.safe_load(
        (DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].split("//")[1].split(":")[0] in services
    ds_var = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == datasource["uid"]
    prom = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool missing: apt-get install -y prometheus")
def test_promtool_accepts_the_prometheus_config() -> None:
    out = subprocess.run(["promtool", "check", "config", str(DASHBOARDS / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
