"""The Grafana dashboard and Prometheus config under `deploy/` match what the service exports:
every metric a panel queries is in `/metrics` (Postgres + Redis deployment), and Prometheus
scrapes the api service's `/metrics`."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.testing import REPO_ROOT
from tests.service.conftest import DataFiles, register_model

DEPLOY = REPO_ROOT / "deploy"
# PromQL functions, aggregations and keywords that look like identifiers in an expression.
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "max", "clamp_min", "le", "route", "status",
                "without", "avg", "min", "increase", "irate"}


def panel_metrics() -> dict[str, set[str]]:
    """Panel title → the metric names its queries use (identifiers outside label matchers, ranges,
    strings and numbers)."""
    found: dict[str, set[str]] = {}
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            names: set[str] = set()
            for target in panel["targets"]:
                expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b\d[\d.]*(?:e[-+]?\d+)?", " ", target["expr"])
                names |= {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_WORDS}
            found[panel["title"]] = names
    return found


@pytest.mark.integration
def test_every_panel_queries_an_exported_metric(client: TestClient, data_files: DataFiles) -> None:
    register_model(client, data_files)  # a request, so the request histograms have samples
    exported = {sample.name for family in text_string_to_metric_families(client.get("/metrics").text)
                for sample in family.samples}
    panels = panel_metrics()
    assert len(panels) >= 6
    for title, names in panels.items():
        assert names, f"panel {title!r} queries no metric"
        missing = names - exported
        assert not missing, f"panel {title!r} uses {sorted(missing)}, not in /metrics"


def test_prometheus_scrapes_the_api() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in json.loads((DEPLOY / "grafana/attribution-service.json").read_text())["panels"]
            for t in p["targets"]}
    assert uids == {datasource["datasources"][0]["uid"]}
