"""`POST /v1/queries?dry_run=true`: validated exactly as a real POST, nothing stored or queued,
an estimate that grows with N and with steps, and cold → warm once a real query ran."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from sqlalchemy import func, select

from service.costs.model import Coefficients
from service.db.models import Query
from service.db.session import session_scope
from service.settings import Settings
from tests.service.conftest import (
    SHARD_SIZES,
    DataFiles,
    Tenants,
    assert_error,
    make_client,
    query_body,
    register_dataset,
    register_model,
)

pytestmark = pytest.mark.integration

DRY = "/v1/queries?dry_run=true"


@pytest.fixture()
def redis(redis_url: str) -> Iterator[Redis]:
    connection = Redis.from_url(redis_url)
    yield connection
    connection.close()


def stored_queries(settings: Settings, tenant: str) -> int:
    """Query rows of the tenant in the database (any status)."""
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Query).where(Query.tenant == tenant)) or 0)


def test_a_dry_run_answers_the_estimate_and_stores_and_enqueues_nothing(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str], redis: Redis,
) -> None:
    assert stored_queries(settings, tenants.tenant_a) == 0
    response = client.post(DRY, json=query_body(*registered), headers={"Idempotency-Key": "dry-1"})
    assert response.status_code == 200, response.text
    assert "location" not in response.headers
    body = response.json()
    assert body["dry_run"] is True and body["method"] == "forward_inf"
    assert body["num_rows"] == sum(SHARD_SIZES) and body["num_query_samples"] == 1
    assert body["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert body["params"]["steps"] == 2 and body["params"]["lr"] == 0.01 and "batch_size" in body["params"]
    assert body["predicted_seconds"] > 0 and body["predicted_seconds_cold"] >= body["predicted_seconds"]
    assert body["peak_memory_bytes"] > 0 and body["rows_x_passes"] > 0
    assert body["cache"] == "cold" and body["warm"]["base_losses"] is False and body["result_cached"] is False
    sweep = next(p for p in body["passes"] if p["name"] == "sweep")
    assert (sweep["rows"], sweep["passes"], sweep["artifact"]) == (sum(SHARD_SIZES), 1, None)
    assert "machine" in body["coefficients"]

    assert stored_queries(settings, tenants.tenant_a) == 0
    assert Queue(settings.queue_name, connection=redis).count == 0
    assert not redis.keys("rq:job:*")
    assert client.get("/v1/queries").json()["items"] == []
    real = client.post("/v1/queries", json=query_body(*registered), headers={"Idempotency-Key": "dry-1"})
    assert real.status_code == 202, real.text  # the key was not used up by the dry run


@pytest.mark.parametrize(("changes", "status", "code"), [
    ({"method": "nope"}, 422, "unknown_method"),
    ({"params": {"steps": 0}}, 422, "invalid_params"),
    ({"params": {"stepz": 1}}, 422, "invalid_params"),
    ({"params": {"steps": 100_000}}, 422, "invalid_params"),
    ({"samples": None}, 422, "invalid_samples"),
    ({"samples": {"x": [[0.1, 0.2]], "y": [1]}}, 422, None),
    ({"top_k": 10**9}, 422, None),
    ({"model_id": "missing"}, 404, "model_not_found"),
    ({"dataset_id": "missing"}, 404, "dataset_not_found"),
    ({"topk": 3}, 422, None),
])
def test_bad_input_answers_exactly_what_a_real_post_answers(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str], changes: dict[str, Any],
    status: int, code: str | None,
) -> None:
    body = {**query_body(*registered), **changes}
    dry = assert_error(client.post(DRY, json=body), status, code)
    real = assert_error(client.post("/v1/queries", json=body), status, code)
    assert dry == real
    assert stored_queries(settings, tenants.tenant_a) == 0


def test_another_tenants_model_is_unknown_to_a_dry_run(
    other_client: TestClient, registered: tuple[str, str],
) -> None:
    assert_error(other_client.post(DRY, json=query_body(*registered)), 404, "model_not_found")


def test_the_estimate_grows_with_steps_and_with_rows(
    client: TestClient, registered: tuple[str, str], data_files: DataFiles,
) -> None:
    model_id, dataset_id = registered

    def estimate(dataset: str, **params: Any) -> dict[str, Any]:
        body = query_body(model_id, dataset, params={"normalize": "none", "lr": 0.01, **params})
        response = client.post(DRY, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    one, many = estimate(dataset_id, steps=1), estimate(dataset_id, steps=40)
    assert one["predicted_seconds_cold"] < many["predicted_seconds_cold"]
    assert one["rows_x_passes_cold"] < many["rows_x_passes_cold"]
    unlearning = {e["params"]["steps"]: next(p for p in e["passes"] if p["name"] == "unlearning") for e in (one, many)}
    assert (unlearning[1]["passes"], unlearning[40]["passes"]) == (1, 40)

    small = client.post("/v1/datasets", json={"name": "one-shard", "shards": [{"uri": data_files.shards[1].as_uri()}]})
    assert small.status_code == 201, small.text
    fewer = estimate(small.json()["id"], steps=1)
    assert fewer["num_rows"] == SHARD_SIZES[1] < one["num_rows"]
    assert fewer["predicted_seconds_cold"] < one["predicted_seconds_cold"]
    assert fewer["rows_x_passes_cold"] < one["rows_x_passes_cold"]


def test_per_sample_and_self_influence_estimates(client: TestClient, registered: tuple[str, str]) -> None:
    model_id, dataset_id = registered
    two = {"x": [[0.1, -0.2, 0.3, 0.05], [0.0, 0.1, 0.2, 0.3]], "y": [1, 2]}
    joint = client.post(DRY, json=query_body(model_id, dataset_id, samples=two)).json()
    per_sample = client.post(DRY, json=query_body(model_id, dataset_id, samples=two, mode="per_sample")).json()
    sweep = {e["mode"]: next(p for p in e["passes"] if p["name"] == "sweep") for e in (joint, per_sample)}
    assert (sweep["joint"]["passes"], sweep["per_sample"]["passes"]) == (1, 2)
    audit = client.post(DRY, json=query_body(model_id, dataset_id, samples=None, self_influence=True))
    assert audit.status_code == 200, audit.text
    assert audit.json()["num_query_samples"] == 0 and audit.json()["self_influence"] is True


def test_an_auto_request_is_estimated_as_the_method_it_resolves_to(
    client: TestClient, registered: tuple[str, str],
) -> None:
    body = query_body(*registered, params={})
    del body["method"]  # omitted: `auto`
    estimate = client.post(DRY, json=body)
    assert estimate.status_code == 200, estimate.text
    audit = client.post(DRY, json=query_body(*registered, method="auto", params={}, samples=None, self_influence=True))
    assert audit.status_code == 200, audit.text
    # a query about a prediction runs Forward-INF; an audit with no checkpoints runs TRAK (attribution.methods.auto)
    assert (estimate.json()["method"], audit.json()["method"]) == ("forward_inf", "trak")
    assert any(p["name"] == "sweep" for p in estimate.json()["passes"])


def test_coefficients_from_settings_scale_the_prediction(
    settings: Settings, tenants: Tenants, data_files: DataFiles, tmp_path: Path,
) -> None:
    """`COST_COEFFICIENTS` (a refit for other hardware) replaces the committed file: seconds are
    linear in the coefficients, so doubling every one doubles the prediction."""
    committed = Coefficients.load()
    doubled = Coefficients({k: 2 * v for k, v in committed.seconds_per_unit.items()}, 2 * committed.seconds_per_batch,
                           2 * committed.seconds_per_sample_row, 2 * committed.overhead_seconds, committed.memory_per_byte, committed.memory_overhead_bytes,
                           {"machine": "twice as slow"})
    doubled.save(tmp_path / "slow.json")
    answers = []
    for current in (settings, settings.model_copy(update={"cost_coefficients": tmp_path / "slow.json"})):
        with make_client(current, tenants.key_a) as http:
            ids = register_model(http, data_files)["id"], register_dataset(http, data_files)["id"]
            response = http.post(DRY, json=query_body(*ids))
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert answers[1]["predicted_seconds_cold"] == pytest.approx(2 * answers[0]["predicted_seconds_cold"], rel=1e-9)
    assert answers[1]["coefficients"] == {"machine": "twice as slow"}
    assert answers[1]["peak_memory_bytes"] == answers[0]["peak_memory_bytes"]


def test_a_dry_run_checks_the_idempotency_key_like_a_real_post(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str],
) -> None:
    first = client.post("/v1/queries", json=query_body(*registered), headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.text
    other = query_body(*registered, top_k=4)
    dry = assert_error(client.post(DRY, json=other, headers={"Idempotency-Key": "k-1"}), 409, "idempotency_key_reused")
    assert dry == assert_error(client.post("/v1/queries", json=other, headers={"Idempotency-Key": "k-1"}), 409)
    retry = client.post(DRY, json=query_body(*registered), headers={"Idempotency-Key": "k-1"})
    assert retry.status_code == 200, retry.text
    assert retry.json()["predicted_seconds"] == 0.0 and retry.json()["rows_x_passes"] == 0
    assert any(first.json()["id"] in note for note in retry.json()["notes"])
    assert stored_queries(settings, tenants.tenant_a) == 1


def test_a_last_layer_tracin_estimate_counts_the_output_layers_parameters(
    client: TestClient, registered: tuple[str, str],
) -> None:
    """The registered 4 → 8 → 3 MLP: TracIn's default on a classifier differentiates the output
    layer only (8·3 + 3 parameters), with `last_layer: false` every one; the estimate says so."""
    model_id, dataset_id = registered

    def estimate(**params: Any) -> dict[str, Any]:
        response = client.post(DRY, json=query_body(model_id, dataset_id, method="tracin", params=params))
        assert response.status_code == 200, response.text
        return response.json()

    last, full = estimate(), estimate(last_layer=False)
    assert last["num_parameters"] == full["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert last["num_parameters_differentiated"] == 8 * 3 + 3
    assert full["num_parameters_differentiated"] == full["num_parameters"]
    assert last["predicted_seconds_cold"] < full["predicted_seconds_cold"]
    layers = client.post(DRY, json=query_body(model_id, dataset_id, method="influence",
                                              params={"layers": ["0"], "ihvp": "cg"})).json()
    assert layers["num_parameters_differentiated"] == 4 * 8 + 8
