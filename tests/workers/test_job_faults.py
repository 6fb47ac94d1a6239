"""Jobs under faults, on the real Postgres and Redis: a cancel, a lost lease and the time
limit stop a job busy in a loop that reports no progress; terminated database connections
are retried, never failing the query (or a whole Forward-INF batch)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from sqlalchemy.exc import OperationalError

from service.api.app import create_app
from service.db.session import get_engine
from service.settings import Settings, get_settings
from tests.dbfaults import sets_status, starts_with, terminate_backends_when
from tests.workers import jobfixtures as jf
from workers import jobs

pytestmark = pytest.mark.integration

# Influence through a LiSSA recursion of up to 10⁶ curvature products (within the limits): on
# the slow model (0.1 s a forward pass) it would run for days, and the recursion reads no
# training rows and reports no progress.
ENDLESS = {"ihvp": "lissa", "lissa_depth": 10_000, "lissa_repeats": 100, "damping": 0.1, "batch_size": 8,
           "fit_batch_size": 8}
STOP_WITHIN_S = 60.0  # liveness bound: the job must end long before its natural end (days)


def _start(query_id: str) -> threading.Thread:
    runner = threading.Thread(target=jobs.run_query, args=(query_id,), daemon=True)
    runner.start()
    return runner


def _running(settings: Settings, query_id: str) -> Callable[[], bool]:
    return lambda: jf.fetch(settings, query_id).status == "running"


@pytest.mark.slow
def test_delete_stops_a_job_inside_a_lissa_recursion(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    slow = jf.register_slow_model(rq_settings, reg)
    query_id = jf.insert_query(rq_settings, reg, method="influence", params=ENDLESS, model_id=slow)
    runner = _start(query_id)
    jf.wait_for(_running(rq_settings, query_id))
    runner.join(timeout=2.0)  # let it reach the recursion
    api = rq_settings.model_copy(update={"api_keys": f"key:{reg.tenant}"})
    with TestClient(create_app(api), headers={"Authorization": "Bearer key"}) as http:
        assert http.delete(f"/v1/queries/{query_id}").json()["status"] == "canceled"
    runner.join(timeout=STOP_WITHIN_S)
    query = jf.fetch(rq_settings, query_id)
    assert not runner.is_alive() and query.status == "canceled"
    assert query.results == [] and query.scores_path is None


def test_a_lost_lease_stops_the_job(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    slow = jf.register_slow_model(rq_settings, reg)
    query_id = jf.insert_query(rq_settings, reg, method="influence", params=ENDLESS, model_id=slow)
    runner = _start(query_id)
    jf.wait_for(_running(rq_settings, query_id))
    runner.join(timeout=2.0)
    Redis.from_url(rq_settings.redis_url or "").set(f"attr:lease:query:{query_id}", "another-worker", ex=60)
    runner.join(timeout=STOP_WITHIN_S)
    query = jf.fetch(rq_settings, query_id)
    assert not runner.is_alive()
    assert query.status == "running" and query.results == []  # the other worker owns it now


def test_job_timeout_stops_the_job_and_fails_the_query(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOB_TIMEOUT_S", "3")
    get_settings.cache_clear()
    settings = get_settings()
    reg = jf.register_toy(settings)
    slow = jf.register_slow_model(settings, reg)
    query_id = jf.insert_query(settings, reg, method="influence", params=ENDLESS, model_id=slow)
    runner = _start(query_id)
    runner.join(timeout=STOP_WITHIN_S)
    query = jf.fetch(settings, query_id)
    assert not runner.is_alive() and query.status == "failed"
    assert query.error is not None and "JOB_TIMEOUT_S = 3 s" in query.error


# ----------------------------------------------------------------------------- database blips
PARAMS = {"steps": 3, "lr": 0.5}


def test_connection_terminated_while_storing_the_result_is_retried(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    with terminate_backends_when(get_engine(rq_settings), sets_status("succeeded")) as fired:
        jobs.run_query(query_id)
    query = jf.fetch(rq_settings, query_id)
    assert fired and query.status == "succeeded", query.error
    assert query.attempts == 1 and query.results


def test_connection_terminated_during_a_progress_write_does_not_fail_the_job(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    with terminate_backends_when(get_engine(rq_settings), starts_with("UPDATE queries SET progress")) as fired:
        jobs.run_query(query_id)
    query = jf.fetch(rq_settings, query_id)
    assert fired and query.status == "succeeded", query.error


def test_connection_terminated_mid_batch_fails_no_query_of_the_batch(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    ids = [jf.insert_query(rq_settings, reg, params=PARAMS, samples={"x": reg.toy.x_test[i:i + 1].tolist(),
                                                                     "y": reg.toy.y_test[i:i + 1].tolist()})
           for i in range(3)]
    with terminate_backends_when(get_engine(rq_settings), sets_status("succeeded")) as fired:
        jobs.run_query(ids[0])  # claims the other two: one sweep for the three
    queries = [jf.fetch(rq_settings, i) for i in ids]
    assert fired
    assert [q.status for q in queries] == ["succeeded"] * 3, [q.error for q in queries]
    assert all((q.extras or {}).get("batched_queries") == 3 for q in queries)


def test_rq_failure_from_a_transient_error_is_not_labelled_worker_lost(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params=PARAMS)
    connection = Redis.from_url(rq_settings.redis_url or "")
    job = Queue(rq_settings.queue_name, connection=connection).enqueue(
        "workers.jobs.run_query", query_id, job_id=query_id)
    error = OperationalError("UPDATE queries ...", {}, Exception("terminating connection due to administrator command"))
    jobs.on_job_failure(job, connection, OperationalError, error, None)
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "queued" and query.error is None  # the reaper re-enqueues it; nothing is failed
