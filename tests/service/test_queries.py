"""Queries over HTTP: submission enqueues an RQ job, polling, results, scores, cache, idempotency, cancel.

No worker runs here: a succeeded query is simulated by writing its result rows and score
file through the repository, exactly as a job would.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from service.api import query_validation
from service.db.models import QueryStatus
from service.db.repositories import jobs as job_repo
from service.db.repositories import queries as query_repo
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

NUM_ROWS = sum(SHARD_SIZES)


@pytest.fixture()
def redis(redis_url: str) -> Iterator[Redis]:
    connection = Redis.from_url(redis_url)
    yield connection
    connection.close()


def finish(settings: Settings, query_id: str, scores: np.ndarray) -> None:
    """Write a query's result as a job does: score file, then `running` → `succeeded` with
    its ranked rows through the job repository (top/bottom 3 of each score row)."""
    settings.scores_dir.mkdir(parents=True, exist_ok=True)
    np.save(settings.scores_dir / f"{query_id}.npy", scores.astype(np.float32))
    matrix = scores.reshape(1, -1) if scores.ndim == 1 else scores
    rows = []
    for sample, vector in enumerate(matrix):
        order = np.argsort(-vector, kind="stable")
        for kind, ranked in (("top", order[:3]), ("bottom", order[::-1][:3])):
            rows += [query_repo.RankedRow(kind=kind, sample=sample, rank=r + 1, index=int(i), sample_id=f"row-{i}",
                                        shard=int(i >= SHARD_SIZES[0]), score=float(vector[i]))
                     for r, i in enumerate(ranked)]
    outcome = job_repo.QueryOutcome(rows=rows, num_scored=NUM_ROWS, scores_path=f"{query_id}.npy",
                                    scores_shape=scores.shape, timings={"sweep_s": 0.25}, extras={"lr": 0.02})
    with session_scope(settings) as session:
        assert job_repo.start_attempt(session, query_id)
    with session_scope(settings) as session:
        assert job_repo.complete(session, query_id, outcome)


def submit(client: TestClient, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post("/v1/queries", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/queries/{response.json()['id']}"
    return response.json()


def test_post_inserts_queued_row_and_enqueues_job_with_query_id(
    client: TestClient, settings: Settings, registered: tuple[str, str], redis: Redis
) -> None:
    body = submit(client, query_body(*registered))
    assert body["status"] == "queued" and body["cached"] is False and body["result"] is None
    assert body["method"] == "forward_inf" and body["num_query_samples"] == 1 and body["mode"] == "joint"
    assert body["params"]["steps"] == 2 and "batch_size" in body["params"]  # defaults filled in
    job = Job.fetch(body["id"], connection=redis)
    assert job.func_name == "workers.jobs.run_query" and job.args == (body["id"],)
    assert body["id"] in Queue(settings.queue_name, connection=redis).job_ids
    assert client.get(f"/v1/queries/{body['id']}").json() == body


def test_succeeded_query_reports_ranked_rows_and_scores_in_every_format(
    client: TestClient, settings: Settings, registered: tuple[str, str]
) -> None:
    query_id = submit(client, query_body(*registered))["id"]
    assert_error(client.get(f"/v1/queries/{query_id}/scores"), 409, "not_finished")
    scores = np.linspace(-1.0, 1.0, NUM_ROWS)[::-1].copy()
    finish(settings, query_id, scores)

    body = client.get(f"/v1/queries/{query_id}").json()
    assert body["status"] == "succeeded" and body["progress"] == 1.0 and body["finished_at"]
    result = body["result"]
    assert [r["index"] for r in result["top"]] == [0, 1, 2] and [r["rank"] for r in result["top"]] == [1, 2, 3]
    assert [r["index"] for r in result["bottom"]] == [9, 8, 7]
    assert result["top"][0] == {"rank": 1, "index": 0, "sample_id": "row-0", "shard": 0, "preview": None,
                                "score": pytest.approx(float(np.float32(1.0))),
                                "stability": None, "rank_low": None, "rank_high": None}
    assert result["num_scored"] == NUM_ROWS and result["timings"] == {"sweep_s": 0.25}
    assert result["extras"] == {"lr": 0.02} and result["scores_shape"] == [NUM_ROWS]
    assert result["per_sample"] is None and result["params"]["steps"] == 2

    as_json = client.get(f"/v1/queries/{query_id}/scores", params={"format": "json"}).json()
    assert as_json["shape"] == [NUM_ROWS]
    np.testing.assert_array_equal(np.array(as_json["scores"], np.float32), scores.astype(np.float32))
    as_csv = client.get(f"/v1/queries/{query_id}/scores", params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(as_csv.text)))
    assert rows[0] == ["index", "score"] and [int(r[0]) for r in rows[1:]] == list(range(NUM_ROWS))
    np.testing.assert_array_equal(np.array([float(r[1]) for r in rows[1:]], np.float32), scores.astype(np.float32))
    as_npy = client.get(f"/v1/queries/{query_id}/scores", params={"format": "npy"})
    np.testing.assert_array_equal(np.load(io.BytesIO(as_npy.content)), scores.astype(np.float32))
    assert_error(client.get(f"/v1/queries/{query_id}/scores", params={"format": "xml"}), 422, mentions="format")

    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
               if line and not line.startswith("#")}
    assert metrics['attribution_jobs{status="succeeded"}'] >= 1  # every tenant's queries, shared test database
    assert metrics["attribution_job_duration_seconds_count"] >= 1
    assert metrics['attribution_job_duration_seconds_bucket{le="+Inf"}'] == metrics["attribution_job_duration_seconds_count"]


def test_per_sample_results_list_one_ranking_per_sample(
    client: TestClient, settings: Settings, registered: tuple[str, str]
) -> None:
    samples = {"x": [[0.1, 0.2, 0.3, 0.4], [-0.5, 0.0, 0.5, 1.0]], "y": [0, 2]}
    query_id = submit(client, query_body(*registered, samples=samples, mode="per_sample"))["id"]
    scores = np.stack([np.arange(NUM_ROWS, dtype=np.float64), -np.arange(NUM_ROWS, dtype=np.float64)])
    finish(settings, query_id, scores)
    result = client.get(f"/v1/queries/{query_id}").json()["result"]
    assert [s["sample"] for s in result["per_sample"]] == [0, 1]
    assert [r["index"] for r in result["per_sample"][0]["top"]] == [9, 8, 7]
    assert [r["index"] for r in result["per_sample"][1]["top"]] == [0, 1, 2]
    assert result["top"] == result["per_sample"][0]["top"] and result["scores_shape"] == [2, NUM_ROWS]
    rows = list(csv.reader(io.StringIO(client.get(f"/v1/queries/{query_id}/scores?format=csv").text)))
    assert rows[0] == ["index", "sample_0", "sample_1"] and rows[4] == ["3", "3", "-3"]
    assert client.get(f"/v1/queries/{query_id}/scores").json()["shape"] == [2, NUM_ROWS]


def test_identical_query_is_answered_from_the_stored_result(
    client: TestClient, other_client: TestClient, settings: Settings,
    registered: tuple[str, str], redis: Redis,
) -> None:
    original = submit(client, query_body(*registered))["id"]
    running = submit(client, query_body(*registered))  # not finished yet: computed again
    assert running["cached"] is False and running["id"] != original
    finish(settings, original, np.arange(NUM_ROWS, dtype=np.float64))

    cached = submit(client, query_body(*registered))
    assert cached["id"] not in (original, running["id"])
    assert cached["cached"] is True and cached["status"] == "succeeded" and cached["source_query_id"] == original
    assert cached["result"] == client.get(f"/v1/queries/{original}").json()["result"]
    assert client.get(f"/v1/queries/{cached['id']}/scores").json()["scores"] == list(map(float, range(NUM_ROWS)))
    assert Job.fetch(running["id"], connection=redis) is not None
    assert cached["id"] not in Queue(settings.queue_name, connection=redis).job_ids  # no job for a cached answer
    again = submit(client, query_body(*registered))
    assert again["cached"] is True and again["source_query_id"] == original  # points at the computing query

    different = submit(client, query_body(*registered, top_k=4))
    assert different["cached"] is False  # another request hash
    metrics = client.get("/metrics").text
    assert "attribution_result_cache_hits_total 2.0" in metrics
    assert "attribution_result_cache_misses_total 3.0" in metrics


def test_cache_is_per_tenant(
    client: TestClient, other_client: TestClient, settings: Settings, data_files: DataFiles
) -> None:
    ids_a = register_model(client, data_files)["id"], register_dataset(client, data_files)["id"]
    ids_b = register_model(other_client, data_files)["id"], register_dataset(other_client, data_files)["id"]
    finish(settings, submit(client, query_body(*ids_a))["id"], np.zeros(NUM_ROWS))
    assert submit(other_client, query_body(*ids_b))["cached"] is False


def test_idempotency_key_returns_the_same_query(client: TestClient, registered: tuple[str, str], redis: Redis) -> None:
    first = submit(client, query_body(*registered), **{"Idempotency-Key": "retry-1"})
    second = submit(client, query_body(*registered), **{"Idempotency-Key": "retry-1"})
    assert second["id"] == first["id"]
    assert len(client.get("/v1/queries").json()["items"]) == 1
    assert_error(client.post("/v1/queries", json=query_body(*registered, top_k=5), headers={"Idempotency-Key": "retry-1"}),
                 409, "idempotency_key_reused")
    assert submit(client, query_body(*registered), **{"Idempotency-Key": "retry-2"})["id"] != first["id"]


def test_list_filters_by_status_and_model(
    client: TestClient, other_client: TestClient, settings: Settings, registered: tuple[str, str],
    data_files: DataFiles,
) -> None:
    model_id, dataset_id = registered
    second_model = register_model(client, data_files, name="second")["id"]
    done = submit(client, query_body(model_id, dataset_id))["id"]
    queued = submit(client, query_body(model_id, dataset_id, top_k=5))["id"]
    other = submit(client, query_body(second_model, dataset_id))["id"]
    finish(settings, done, np.zeros(NUM_ROWS))

    def ids(**params: Any) -> list[str]:
        return [q["id"] for q in client.get("/v1/queries", params=params).json()["items"]]

    assert ids() == [other, queued, done]
    assert ids(status="succeeded") == [done]
    assert ids(status="queued", model_id=model_id) == [queued]
    assert ids(model_id=second_model) == [other]
    assert all(q["result"] is None for q in client.get("/v1/queries").json()["items"])
    page = client.get("/v1/queries", params={"limit": 2}).json()
    assert page["next_offset"] == 2 and len(page["items"]) == 2
    assert_error(client.get("/v1/queries", params={"status": "done"}), 422, "invalid_input", "status")
    assert other_client.get("/v1/queries").json()["items"] == []
    assert_error(other_client.get(f"/v1/queries/{done}"), 404, "query_not_found")
    assert_error(other_client.get(f"/v1/queries/{done}/scores"), 404, "query_not_found")
    assert_error(other_client.delete(f"/v1/queries/{queued}"), 404)


def test_queries_may_not_use_another_tenants_model(
    client: TestClient, other_client: TestClient, registered: tuple[str, str]
) -> None:
    assert_error(other_client.post("/v1/queries", json=query_body(*registered)), 404, "model_not_found")


def test_delete_cancels_queued_query_and_its_job(
    client: TestClient, settings: Settings, registered: tuple[str, str], redis: Redis
) -> None:
    query_id = submit(client, query_body(*registered))["id"]
    response = client.delete(f"/v1/queries/{query_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled" and response.json()["finished_at"]
    assert Job.fetch(query_id, connection=redis).get_status() == JobStatus.CANCELED
    assert client.delete(f"/v1/queries/{query_id}").json()["status"] == "canceled"  # repeat is harmless
    assert_error(client.get(f"/v1/queries/{query_id}/scores"), 409, "not_finished")

    done = submit(client, query_body(*registered, top_k=7))["id"]
    finish(settings, done, np.zeros(NUM_ROWS))
    assert_error(client.delete(f"/v1/queries/{done}"), 409, "query_finished")
    assert client.get(f"/v1/queries/{done}").json()["status"] == QueryStatus.SUCCEEDED


def test_queue_down_marks_the_query_failed_and_answers_503(
    settings: Settings, tenants: Tenants, registered: tuple[str, str]
) -> None:
    broken_queue = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with make_client(broken_queue, tenants.key_a) as http:
        response = http.post("/v1/queries", json=query_body(*registered), headers={"Idempotency-Key": "k"})
        assert_error(response, 503, "queue_unavailable")
        [failed] = http.get("/v1/queries").json()["items"]
        assert failed["status"] == "failed" and "queue" in failed["error"]
    with make_client(settings, tenants.key_a) as http:  # queue back: the retry with the same key runs
        retried = submit(http, query_body(*registered), **{"Idempotency-Key": "k"})
        assert retried["id"] != failed["id"] and retried["status"] == "queued"


def test_cached_answer_loads_no_model(
    client: TestClient, settings: Settings, registered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = submit(client, query_body(*registered))["id"]
    finish(settings, original, np.ones(NUM_ROWS))

    evaluated: list[int] = []
    real_parse_samples = query_validation.check_samples_against_model

    def counting(*args: Any, **kwargs: Any) -> int:
        evaluated.append(1)
        return real_parse_samples(*args, **kwargs)

    monkeypatch.setattr(query_validation, "check_samples_against_model", counting)
    assert submit(client, query_body(*registered))["source_query_id"] == original
    assert evaluated == []  # the cached path never touched the model
    assert submit(client, query_body(*registered, top_k=9))["cached"] is False
    assert evaluated == [1]  # a miss does evaluate the samples


def test_self_influence_and_referenced_samples_are_accepted(
    client: TestClient, other_client: TestClient, registered: tuple[str, str], data_files: DataFiles
) -> None:
    model_id, dataset_id = registered
    audit = submit(client, query_body(model_id, dataset_id, samples=None, self_influence=True))
    assert audit["self_influence"] is True and audit["num_query_samples"] == 0 and audit["status"] == "queued"
    refs = {"refs": [{"dataset_id": dataset_id, "index": 3}, {"dataset_id": dataset_id, "index": NUM_ROWS - 1}]}
    assert submit(client, query_body(model_id, dataset_id, samples=refs))["num_query_samples"] == 2
    out_of_range = {"refs": [{"dataset_id": dataset_id, "index": NUM_ROWS}]}
    assert_error(client.post("/v1/queries", json=query_body(model_id, dataset_id, samples=out_of_range)),
                 422, "invalid_samples", "samples.refs[0]")
    foreign = register_dataset(other_client, data_files)["id"]
    foreign_refs = {"refs": [{"dataset_id": foreign, "index": 0}]}
    assert_error(client.post("/v1/queries", json=query_body(model_id, dataset_id, samples=foreign_refs)),
                 422, "invalid_samples", "samples.refs[0]")


def test_deleted_model_keeps_its_queries_results(
    client: TestClient, settings: Settings, registered: tuple[str, str]
) -> None:
    model_id, dataset_id = registered
    query_id = submit(client, query_body(model_id, dataset_id))["id"]
    finish(settings, query_id, np.arange(NUM_ROWS, dtype=np.float64))
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    body = client.get(f"/v1/queries/{query_id}").json()
    assert body["status"] == "succeeded" and [r["index"] for r in body["result"]["top"]] == [9, 8, 7]
    assert client.get(f"/v1/queries/{query_id}/scores").status_code == 200
    assert_error(client.post("/v1/queries", json=query_body(model_id, dataset_id)), 404, "model_not_found")


@pytest.mark.parametrize("key", ["", "a" * 257, "has space", "é"])
def test_malformed_idempotency_keys_are_422(client: TestClient, registered: tuple[str, str], key: str) -> None:
    headers = {b"Idempotency-Key": key.encode("latin-1")}  # bytes: httpx refuses non-ASCII text
    response = client.post("/v1/queries", json=query_body(*registered), headers=headers)
    assert_error(response, 422, "invalid_input", "Idempotency-Key")
