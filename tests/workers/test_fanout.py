"""Fan-out details on the real Postgres and Redis: one file per part, a corrupt part fails the
query at the merge (nothing half-written), a worker reads a query's model and dataset rows
once, bookkeeping commits that skip the WAL flush stay local to their transaction, and a
fanned-out query's callback is posted once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import event, text

from service import queue
from service.db.session import get_engine, relaxed_commit, session_scope
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf
from workers import fanout_plan, part_files

pytestmark = pytest.mark.integration

PARAMS = {"steps": 2, "lr": 0.5, "normalize": "none"}  # raw scores: relative (the default) is not fanned out


@pytest.fixture()
def fanned(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with `FANOUT_ROWS` 25: the toy shards 20/15/25 → parts [0,20) [20,35) [35,60)."""
    monkeypatch.setenv("FANOUT_ROWS", "25")
    get_settings.cache_clear()
    return get_settings()


def _run(settings: Settings, **query: Any) -> str:
    reg = jf.register_toy(settings)
    query_id = jf.insert_query(settings, reg, params=PARAMS, **query)
    queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)
    jf.work(settings)
    return query_id


def test_each_part_writes_one_file_with_its_scores_and_timings(fanned: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    real_load = part_files.load_part

    def recording_load(path: Path, rows: int) -> tuple[np.ndarray, dict[str, Any]]:
        saved[path.name] = real_load(path, rows)
        return saved[path.name]

    monkeypatch.setattr(part_files, "load_part", recording_load)
    query_id = _run(fanned)
    query = jf.fetch(fanned, query_id)
    assert query.status == "succeeded", query.error
    assert sorted(saved) == [f"{query_id}.part{k}.npz" for k in range(3)]
    assert [saved[f"{query_id}.part{k}.npz"][0].shape for k in range(3)] == [(1, 20), (1, 15), (1, 25)]
    np.testing.assert_array_equal(np.concatenate([saved[f"{query_id}.part{k}.npz"][0] for k in range(3)], axis=1)[0],
                                  jf.load_scores(fanned, query))
    assert all({"part_claim_s", "sweep_s", "total_s"} <= set(meta["timings"]) for _, meta in saved.values())
    assert query.timings is not None and query.timings["sweep_s"] == pytest.approx(
        sum(meta["timings"]["sweep_s"] for _, meta in saved.values()))
    assert sorted(p.name for p in fanned.scores_dir.iterdir()) == [f"{query_id}.npy"]  # part files removed


def test_a_part_file_of_the_wrong_width_fails_the_query_at_the_merge(fanned: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = part_files.save_part

    def dropping_a_column(path: Path, scores: np.ndarray, meta: dict[str, Any]) -> None:
        real_save(path, scores[:, :-1] if path.name.endswith(".part1.npz") else scores, meta)

    monkeypatch.setattr(part_files, "save_part", dropping_a_column)
    query_id = _run(fanned)
    query = jf.fetch(fanned, query_id)
    assert query.status == "failed"
    assert query.error == f"merge: ValueError: {query_id}.part1.npz holds scores of shape (1, 14), expected 15 columns"
    assert query.results == [] and query.scores_path is None and query.num_scored is None
    assert not fanned.scores_dir.exists() or not any(fanned.scores_dir.iterdir())


def test_a_worker_reads_the_model_and_dataset_rows_once(fanned: Settings) -> None:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = get_engine(fanned)
    reg = jf.register_toy(fanned)
    query_id = jf.insert_query(fanned, reg, params=PARAMS)
    queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=fanned)
    event.listen(engine, "before_cursor_execute", record)
    try:
        jf.work(fanned)  # run_query, three parts and the merge, all in this process
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert jf.fetch(fanned, query_id).status == "succeeded"
    model_reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM models" in s]
    assert len(model_reads) == 2  # run_query's own read, then the first part's; later parts and the merge reuse it


def test_a_relaxed_commit_applies_to_its_own_transaction_only(rq_settings: Settings) -> None:
    with session_scope(rq_settings) as session:
        relaxed_commit(session)
        assert session.execute(text("SHOW synchronous_commit")).scalar() == "off"
    for _ in range(3):  # the pooled connection is handed out again with the server default
        with session_scope(rq_settings) as session:
            assert session.execute(text("SHOW synchronous_commit")).scalar() == "on"


def test_a_fanned_out_query_posts_its_callback_once_with_the_final_status(fanned: Settings,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    posted: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(httpx, "post", lambda url, json, timeout: posted.append((url, json)))
    query_id = _run(fanned, callback_url="http://127.0.0.1:9/hook")
    assert jf.fetch(fanned, query_id).status == "succeeded"
    assert posted == [("http://127.0.0.1:9/hook", {"id": query_id, "status": "succeeded"})]


@pytest.mark.parametrize(("task", "params", "fans_out"), [
    ("classification", {}, False),  # every task's defaults score relative (a whole-dataset denominator)
    ("classification", {"normalize": "none"}, True),
    ("causal_lm", {}, False),
    ("causal_lm", {"normalize": "none"}, True),
    ("classification", {"normalize": "relative"}, False),
])
def test_fan_out_follows_the_models_task_defaults(task: str, params: dict[str, Any], fans_out: bool) -> None:
    from service.db.models import Query

    query = Query(method="forward_inf", params=params)
    assert fanout_plan.should_fan_out(query, 10**6, Settings(fanout_rows=10), task=task) is fans_out
