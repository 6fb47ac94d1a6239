"""Rank stability on the queue path (Postgres, Redis, an RQ worker): the job stores each ranked
row's figures equal to the core library's, and a query asking for them runs as one job even
where the dataset would fan out (each resample is ranked over every row)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sqlalchemy import update

from attribution.artifacts import InMemoryArtifacts
from attribution.data import TensorTrainingSet
from attribution.methods.base import AttributionMethod, FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.stability import StabilityParams, StabilityReport, rank_stability
from attribution.tasks import ClassificationTask
from service import queue
from service.db.models import Query
from service.db.session import session_scope
from service.settings import Settings, get_settings
from tests.workers import jobfixtures as jf
from workers.batching import sweep_key

pytestmark = pytest.mark.integration


def _direct(reg: jf.Registered, method: str, params: dict[str, Any], resamples: int, k: int) -> StabilityReport:
    train = TensorTrainingSet(torch.from_numpy(reg.toy.x), torch.from_numpy(reg.toy.y))
    fitted: list[AttributionMethod] = []
    queries = jf.query_batch(reg)
    scores = attribute(ModelAdapter(reg.toy.module, ClassificationTask()), method, params, train,
                       FitContext("direct", InMemoryArtifacts()), queries=queries, on_fitted=fitted.append)
    return rank_stability(fitted[0], scores.float(), train, StabilityParams(resamples), queries=queries, k=k)


def _stability_query(settings: Settings, reg: jf.Registered, method: str, params: dict[str, Any],
                     resamples: int) -> str:
    query_id = jf.insert_query(settings, reg, method=method, params=params, top_k=4)
    with session_scope(settings) as session:
        session.execute(update(Query).where(Query.id == query_id).values(stability={"resamples": resamples}))
    queue.enqueue("workers.jobs.run_query", query_id, job_id=query_id, settings=settings)
    return query_id


@pytest.mark.parametrize(("method", "params", "resampling"), [
    ("forward_inf", {"normalize": "none"}, "step_size"),
    ("gradient_similarity", {"projection_dim": 4}, "projection_seed"),
])
def test_worker_stores_the_library_figures_in_one_job(
    rq_settings: Settings, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any], resampling: str
) -> None:
    reg = jf.register_toy(rq_settings)
    monkeypatch.setenv("FANOUT_ROWS", "18")
    get_settings.cache_clear()
    settings = get_settings()
    plain = jf.insert_query(settings, reg, method=method, params=params, top_k=4)
    queue.enqueue("workers.jobs.run_query", plain, job_id=plain, settings=settings)
    query_id = _stability_query(settings, reg, method, params, 4)
    jf.work(settings)
    assert jf.fetch(settings, plain).num_parts > 1  # without stability the same query fans out
    query = jf.fetch(settings, query_id)
    assert query.status == "succeeded", query.error
    assert query.num_parts == 1 and not query.parts
    assert query.extras is not None and query.extras["stability"]["resampling"] == resampling
    assert query.timings is not None and query.timings["stability_s"] > 0
    expected = _direct(reg, method, params, 4, 4)
    assert len(query.results) == 8
    for row in query.results:
        figures = expected.get(row.kind, row.sample, row.index)
        assert figures is not None, (row.kind, row.index)
        assert row.stability == pytest.approx(figures.stability)
        assert (row.rank_low, row.rank_high) == (figures.rank_low, figures.rank_high)


def test_a_stability_query_never_shares_a_forward_inf_sweep() -> None:
    def query(**extra: Any) -> Query:
        return Query(method="forward_inf", mode="joint", self_influence=False, params={"normalize": "none"},
                     model_id="m", dataset_id="d", **extra)

    assert sweep_key(query()) is not None
    assert sweep_key(query(stability={"resamples": 2})) is None
