"""Embedded mode (no REDIS_URL): the API's lifespan recovers queries a previous, dead API
process left `queued` or `running`, and runs the periodic reaper until shutdown."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from service.db.models import Query
from service.db.session import session_scope
from service.settings import Settings
from tests.service import embedded as e
from tests.workers import jobfixtures as jf

PARAMS = {"steps": 2, "lr": 0.5}


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return e.embedded_settings(tmp_path / "data")


def _left_behind(settings: Settings, reg: jf.Registered, **state: object) -> str:
    """A query row as a process that died mid-job leaves it (no lease, no job anywhere)."""
    query_id = jf.insert_query(settings, reg, params=PARAMS)
    if state:
        with session_scope(settings) as session:
            session.execute(update(Query).where(Query.id == query_id).values(**state))
    return query_id


def _reaper_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "stale-job-reaper" and t.is_alive())


def test_start_up_resumes_what_a_dead_process_left_and_shutdown_stops_the_reaper(settings: Settings) -> None:
    reg = jf.register_toy(settings)
    running = _left_behind(settings, reg, status="running", attempts=1, progress=0.4)
    queued = _left_behind(settings, reg)
    exhausted = _left_behind(settings, reg, status="running", attempts=settings.job_retries + 1)
    threads = _reaper_threads()

    with e.client(settings):
        assert _reaper_threads() == threads + 1
        for query_id in (running, queued, exhausted):
            jf.wait_for(lambda q=query_id: jf.is_final(settings, q))
    assert _reaper_threads() == threads

    expected = jf.expected_scores(reg, "forward_inf", PARAMS, samples=jf.query_batch(reg))[0].numpy()
    for query_id, attempts in ((running, 2), (queued, 1)):
        query = jf.fetch(settings, query_id)
        assert (query.status, query.attempts, query.error) == ("succeeded", attempts, None)
        np.testing.assert_allclose(jf.load_scores(settings, query), expected, rtol=1e-5, atol=1e-6)
    lost = jf.fetch(settings, exhausted)
    assert lost.status == "failed" and (lost.error or "").startswith("worker lost")


def test_the_queue_mode_api_runs_no_reaper(settings: Settings, redis_url: str) -> None:
    """With a queue the workers reap (`python -m workers`); the API leaves open queries alone."""
    reg = jf.register_toy(settings)
    running = _left_behind(settings, reg, status="running", attempts=1)
    threads = _reaper_threads()
    with e.client(settings.model_copy(update={"redis_url": redis_url})) as http:
        assert http.get("/healthz").status_code == 200
        assert _reaper_threads() == threads
    assert jf.fetch(settings, running).status == "running"
