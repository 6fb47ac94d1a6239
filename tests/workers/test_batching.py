"""Batched Forward-INF queries (`workers.batching`) on the real Postgres and Redis, through RQ."""

from __future__ import annotations

import numpy as np
import pytest

from service import queue
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf

pytestmark = pytest.mark.integration

PARAMS = {"steps": 3, "lr": 0.5, "normalize": "none"}  # "c" below is relative


def _samples(reg: jf.Registered, lo: int, hi: int) -> dict[str, list]:
    return {"x": reg.toy.x_test[lo:hi].tolist(), "y": reg.toy.y_test[lo:hi].tolist()}


def _submit(settings: Settings, reg: jf.Registered) -> dict[str, str]:
    """Six queued queries: two raw ones share a sweep, two relative ones another (relative scores of
    classifiers sweep log-losses), two cannot join either."""
    ids = {
        "a": jf.insert_query(settings, reg, params=PARAMS, samples=_samples(reg, 0, 2)),
        "b": jf.insert_query(settings, reg, params=PARAMS, samples=_samples(reg, 2, 3)),
        "c": jf.insert_query(settings, reg, params={**PARAMS, "normalize": "relative"}, samples=_samples(reg, 3, 6)),
        "d": jf.insert_query(settings, reg, params={**PARAMS, "normalize": "relative"}, samples=_samples(reg, 0, 2)),
        "other_lr": jf.insert_query(settings, reg, params={"steps": 3, "lr": 0.25}, samples=_samples(reg, 0, 2)),
        "per_sample": jf.insert_query(settings, reg, params=PARAMS, mode="per_sample", samples=_samples(reg, 0, 2)),
    }
    for query_id in ids.values():
        queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)
    return ids


def _use_cap(monkeypatch: pytest.MonkeyPatch, cap: int) -> Settings:
    monkeypatch.setenv("BATCH_MAX_QUERIES", str(cap))
    get_settings.cache_clear()
    return get_settings()


def test_compatible_queries_share_one_sweep_and_match_one_by_one(
        rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = jf.register_toy(rq_settings)
    batched = _submit(rq_settings, reg)
    jf.work(rq_settings)
    alone_settings = _use_cap(monkeypatch, 1)
    alone = _submit(alone_settings, reg)
    jf.work(alone_settings)

    for name in batched:
        one, two = jf.fetch(rq_settings, batched[name]), jf.fetch(rq_settings, alone[name])
        assert (one.status, two.status) == ("succeeded", "succeeded"), (one.error, two.error)
        assert one.attempts == 1  # the companions' own RQ jobs were no-ops
        expected_group = 2 if name in ("a", "b", "c", "d") else None
        assert (one.extras or {}).get("batched_queries") == expected_group
        assert (two.extras or {}).get("batched_queries") is None
        # Same ops on the same batches: identical up to 1e-6 (bitwise equal in practice).
        np.testing.assert_allclose(jf.load_scores(rq_settings, one), jf.load_scores(rq_settings, two),
                                   rtol=1e-6, atol=1e-7)
        assert jf.ranking(one, "top") == jf.ranking(two, "top")
        assert jf.ranking(one, "bottom") == jf.ranking(two, "bottom")
    # Each batched query equals the in-memory pipeline on its own samples.
    expected = jf.expected_scores(reg, "forward_inf", PARAMS, samples=jf.query_batch(reg, 2))[0].numpy()
    np.testing.assert_allclose(jf.load_scores(rq_settings, jf.fetch(rq_settings, batched["a"])), expected,
                               rtol=1e-5, atol=1e-6)
    assert jf.fetch(rq_settings, batched["a"]).scores_path != jf.fetch(rq_settings, batched["b"]).scores_path


def test_cap_limits_the_group_and_the_rest_run_later(rq_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _use_cap(monkeypatch, 2)
    reg = jf.register_toy(settings)
    ids = [jf.insert_query(settings, reg, params=PARAMS, samples=_samples(reg, i, i + 1)) for i in range(5)]
    for query_id in ids:
        queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)
    jf.work(settings)
    queries = [jf.fetch(settings, i) for i in ids]
    assert [q.status for q in queries] == ["succeeded"] * 5
    assert [(q.extras or {}).get("batched_queries") for q in queries] == [2, 2, 2, 2, None]
    assert all(q.attempts == 1 for q in queries)


def test_a_canceled_companion_is_not_claimed(rq_settings: Settings) -> None:
    from service.db.models import Query
    from service.db.session import session_scope

    reg = jf.register_toy(rq_settings)
    first = jf.insert_query(rq_settings, reg, params=PARAMS, samples=_samples(reg, 0, 1))
    canceled = jf.insert_query(rq_settings, reg, params=PARAMS, samples=_samples(reg, 1, 2))
    with session_scope(rq_settings) as session:
        row = session.get(Query, canceled)
        assert row is not None
        row.status = "canceled"
    queue.enqueue("workers.jobs.run_query", first, job_id=first, settings=rq_settings)
    jf.work(rq_settings)
    assert jf.fetch(rq_settings, first).status == "succeeded"
    assert (jf.fetch(rq_settings, first).extras or {}).get("batched_queries") is None
    after = jf.fetch(rq_settings, canceled)
    assert (after.status, after.attempts, after.scores_path) == ("canceled", 0, None)
