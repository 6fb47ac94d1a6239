"""Dry runs see the cache (embedded mode: file artifact store, in-process worker): every
cacheable part of a method is cold before its first query and warm after it, the warm
estimate is below the cold one, and an identical succeeded query is reported as answered at
once. This also checks that `service.costs.artifacts` rebuilds the methods' real keys."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service import embedded as e

settings, http = e.module_service("dry-run-warm")


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    return e.register_toy(settings, http)


def body(ids: dict[str, str], method: str, params: dict[str, Any], count: int = 2) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": method, "samples": e.samples(count),
            "top_k": 3, "params": params}


def dry(http: TestClient, query: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/queries?dry_run=true", json=query)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize(("method", "params", "artifacts"), [
    ("forward_inf", {}, {"base_losses", "base_log_losses", "relative_norm"}),
    ("influence", {}, {"curvature_trace", "ihvp_fit", "relative_norm"}),
    ("influence", {"ihvp": "ekfac", "damping": 0.01, "normalize": "none"}, {"ihvp_fit"}),
    ("tracin", {}, {"relative_norm"}),
    ("trak", {"projection_dim": 8}, {"trak_features"}),
    ("trackstar", {"projection_dim": 8}, {"trackstar_features", "trackstar_second_moment"}),
])
def test_each_cacheable_part_is_cold_before_the_first_query_and_warm_after(
    http: TestClient, ids: dict[str, str], method: str, params: dict[str, Any], artifacts: set[str],
) -> None:
    before = dry(http, body(ids, method, params))
    assert before["cache"] == "cold" and set(before["warm"]) == artifacts and not any(before["warm"].values())
    assert before["predicted_seconds"] == before["predicted_seconds_cold"]

    e.run(http, body(ids, method, params))
    other = dry(http, body(ids, method, params, count=1))  # another query of the same model and data
    assert other["cache"] == "warm" and all(other["warm"].values()), other["warm"]
    assert other["result_cached"] is False
    assert other["predicted_seconds"] < other["predicted_seconds_cold"]
    assert other["rows_x_passes"] < other["rows_x_passes_cold"]
    assert all(p["warm"] == (p["artifact"] is not None) for p in other["passes"])

    same = dry(http, body(ids, method, params))  # identical to the succeeded query
    assert same["result_cached"] is True and same["predicted_seconds"] == 0.0


def test_a_dry_run_in_embedded_mode_stores_nothing(http: TestClient, ids: dict[str, str]) -> None:
    before = http.get("/v1/queries").json()["items"]
    dry(http, body(ids, "gradient_similarity", {}))
    assert http.get("/v1/queries").json()["items"] == before
