"""The stale-job reaper and RQ's failure callback: no query stays `running` forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job
from sqlalchemy import update

from service.db.models import Query, QueryPart, utcnow
from service.db.session import session_scope
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf
from tests.workers.conftest import ARCHITECTURES
from workers import jobs
from workers.leases import leases
from workers.reaper import reap_stale_queries

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _set(settings: Settings, query_id: str, **values: object) -> None:
    with session_scope(settings) as session:
        session.execute(update(Query).where(Query.id == query_id).values(**values))


def _rq_status(settings: Settings, job_id: str) -> str:
    status = Job.fetch(job_id, connection=Redis.from_url(settings.redis_url or "")).get_status()
    return str(getattr(status, "value", status))


def test_running_query_without_a_lease_is_requeued_and_then_completes(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg, params={"steps": 2, "lr": 0.5})
    _set(rq_settings, query_id, status="running", attempts=1)  # its worker died: no lease, no job
    report = reap_stale_queries(rq_settings)
    assert query_id in report.requeued and query_id not in report.failed
    assert jf.fetch(rq_settings, query_id).status == "queued"
    assert _rq_status(rq_settings, query_id) == "queued"
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    assert (query.status, query.attempts) == ("succeeded", 2)


def test_exhausted_attempts_fail_with_worker_lost(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg)
    _set(rq_settings, query_id, status="running", attempts=rq_settings.job_retries + 1)
    assert query_id in reap_stale_queries(rq_settings).failed
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "failed" and (query.error or "").startswith("worker lost")
    assert query.finished_at is not None


def test_live_leases_and_pending_jobs_are_left_alone(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    running = jf.insert_query(rq_settings, reg)
    _set(rq_settings, running, status="running", attempts=1)
    assert leases(rq_settings).acquire(f"query:{running}", "a-live-worker")
    waiting = jf.insert_query(rq_settings, reg)  # queued and its RQ job is pending
    _set(rq_settings, waiting, created_at=utcnow() - timedelta(minutes=10))
    Queue(rq_settings.queue_name, connection=Redis.from_url(rq_settings.redis_url or "")).enqueue(
        "workers.jobs.run_query", waiting, job_id=waiting)
    fresh = jf.insert_query(rq_settings, reg)  # just submitted: the API may not have enqueued it yet
    report = reap_stale_queries(rq_settings)
    assert not {running, waiting, fresh} & {*report.requeued, *report.failed}
    assert [jf.fetch(rq_settings, q).status for q in (running, waiting, fresh)] == ["running", "queued", "queued"]
    for query_id in (running, waiting, fresh):  # leave no open rows for later reaper runs
        _set(rq_settings, query_id, status="canceled")


def test_queued_query_whose_job_was_lost_is_enqueued_again(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg)
    _set(rq_settings, query_id, created_at=utcnow() - timedelta(minutes=10))  # never enqueued (API crashed)
    assert query_id in reap_stale_queries(rq_settings).requeued
    jf.work(rq_settings)
    assert jf.fetch(rq_settings, query_id).status == "succeeded"


def test_lost_fan_out_part_is_resumed(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FANOUT_ROWS", "25")
    get_settings.cache_clear()
    settings = get_settings()
    reg = jf.register_toy(settings)  # shards 20/15/25 → parts [0,20) [20,35) [35,60)
    query_id = jf.insert_query(settings, reg, params={"steps": 2, "lr": 0.5, "normalize": "none"})  # fanned out
    jobs.run_query(query_id)  # dispatches three part jobs
    Queue(settings.queue_name, connection=Redis.from_url(settings.redis_url or "")).empty()  # ... which get lost
    with session_scope(settings) as session:
        session.execute(update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == 1)
                        .values(status="running"))
    assert query_id in reap_stale_queries(settings).requeued
    jf.work(settings)
    query = jf.fetch(settings, query_id)
    assert query.status == "succeeded", query.error
    assert [p.status for p in query.parts] == ["succeeded"] * 3 and query.num_scored == 60


def test_rq_failure_callback_fails_the_query_only_when_rq_gives_up(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    query_id = jf.insert_query(rq_settings, reg)
    _set(rq_settings, query_id, status="running", attempts=1)
    jobs.on_job_failure(SimpleNamespace(retries_left=1, args=(query_id,)), None, RuntimeError, RuntimeError("x"))
    assert jf.fetch(rq_settings, query_id).status == "running"  # RQ retries it
    from rq.exceptions import AbandonedJobError

    jobs.on_job_failure(SimpleNamespace(retries_left=0, args=(query_id,)), None, AbandonedJobError, AbandonedJobError())
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "failed" and "worker lost" in (query.error or "") and "AbandonedJobError" in (query.error or "")


def _worker(settings: Settings, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": settings.database_url or "",
           "REDIS_URL": settings.redis_url or "", "DATA_ROOT": str(settings.data_root),
           "ALLOWED_ARCHITECTURES": ARCHITECTURES, "DEVICE": "cpu", "WORKER_LEASE_TTL_S": "2",
           "REAPER_INTERVAL_S": "1", "JOB_RETRIES": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "workers", "--name", name], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_killed_worker_query_finishes_on_another_worker(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings)
    slow = jf.register_slow_model(rq_settings, reg)
    query_id = jf.insert_query(rq_settings, reg, params={"steps": 1, "lr": 0.5, "batch_size": 4}, model_id=slow)
    first = _worker(rq_settings, f"doomed-{query_id[:8]}")
    second = None
    try:
        from service import queue

        queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=rq_settings)
        jf.wait_for(lambda: jf.fetch(rq_settings, query_id).progress > 0, timeout=60, interval=0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert jf.fetch(rq_settings, query_id).status == "running"  # orphaned mid-run
        second = _worker(rq_settings, f"rescuer-{query_id[:8]}")
        jf.wait_for(lambda: jf.is_final(rq_settings, query_id), timeout=90, interval=0.2)
        query = jf.fetch(rq_settings, query_id)
        assert query.status == "succeeded", query.error
        assert query.attempts == 2 and query.num_scored == 60
        second.send_signal(signal.SIGTERM)  # warm shutdown
        assert second.wait(timeout=30) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
