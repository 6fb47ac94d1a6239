"""Grouped queries in the jobs (real Postgres and Redis, an RQ worker): a fanned-out query
aggregates the merged `[Q, N]` matrix exactly like a single job, and a `group` column
missing at run time fails the query with a readable error."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update

from service import queue
from service.db.models import Query
from service.db.session import session_scope
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf
from tests.workers import support
from workers.grouping import ordered_group_ids

pytestmark = pytest.mark.integration

SIZES = (20, 15, 25)
GROUPS = [("u3", "u1", "u2", "u10")[(i * 7) % 4] for i in range(60)]


def _grouped_dataset(settings: Settings, reg: jf.Registered, *, with_groups: bool = True) -> str:
    paths, start = [], 0
    for position, size in enumerate(SIZES):
        stop = start + size
        arrays: dict[str, Any] = {"x": reg.toy.x[start:stop], "y": reg.toy.y[start:stop]}
        if with_groups:
            arrays["group"] = np.array(GROUPS[start:stop])
        path = settings.data_root / f"grouped-{int(with_groups)}-{position}.npz"
        np.savez(path, **arrays)
        paths.append(path)
        start = stop
    with session_scope(settings) as session:
        return support.register_dataset(session, reg.tenant, paths).id


def _grouped_query(settings: Settings, reg: jf.Registered, dataset_id: str, group_by: str, reduce: str) -> str:
    query_id = jf.insert_query(settings, reg, method="gradient_similarity", params={"similarity": "dot"},
                               mode="per_sample", top_k=3)
    with session_scope(settings) as session:
        session.execute(update(Query).where(Query.id == query_id)
                        .values(dataset_id=dataset_id, group_by=group_by, group_reduce=reduce))
    queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)
    return query_id


def test_fanned_out_groups_equal_a_single_job(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = jf.register_toy(rq_settings, sizes=SIZES)
    dataset = _grouped_dataset(rq_settings, reg)
    single = _grouped_query(rq_settings, reg, dataset, "group", "sum")
    jf.work(rq_settings)

    monkeypatch.setenv("FANOUT_ROWS", "18")
    get_settings.cache_clear()
    settings = get_settings()
    fanned = _grouped_query(settings, reg, dataset, "group", "sum")
    jf.work(settings)

    one, many = jf.fetch(settings, single), jf.fetch(settings, fanned)
    assert (one.status, many.status) == ("succeeded", "succeeded"), (one.error, many.error)
    assert many.num_parts == 5 and many.scores_shape == {"shape": [2, 4]} and many.num_scored == 60
    labels = ordered_group_ids(GROUPS)
    assert labels == ["u1", "u10", "u2", "u3"]  # not all integers: text order
    rows = jf.expected_scores(reg, "gradient_similarity", {"similarity": "dot"}, samples=jf.query_batch(reg),
                              per_sample=True).numpy()
    expected = np.stack([rows[:, np.asarray(GROUPS) == g].sum(axis=1) for g in labels], axis=1)
    np.testing.assert_allclose(jf.load_scores(settings, one), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jf.load_scores(settings, many), jf.load_scores(settings, one), rtol=1e-5, atol=1e-7)
    assert [(r.index, r.sample_id) for r in many.results if r.kind == "top" and r.sample == 1] == \
        [(int(g), labels[g]) for g in np.argsort(-expected[1], kind="stable")[:3]]
    sidecar = json.loads((settings.scores_dir / f"{fanned}.groups.json").read_text())
    assert sidecar == {"group_by": "group", "groups": labels}


def test_a_missing_group_column_fails_the_query(rq_settings: Settings) -> None:
    reg = jf.register_toy(rq_settings, sizes=SIZES)
    query_id = _grouped_query(rq_settings, reg, _grouped_dataset(rq_settings, reg, with_groups=False), "group", "mean")
    jf.work(rq_settings)
    query = jf.fetch(rq_settings, query_id)
    assert query.status == "failed" and query.error == "ShardError: group_by: shards[0] has no `group` column"
    assert not (rq_settings.scores_dir / f"{query_id}.npy").exists()
