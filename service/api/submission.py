"""`POST /v1/queries`: validate, answer from an identical earlier query, or insert and enqueue.

Order of work, cheapest first:
1. every check of the request and its hash (`service.api.query_validation.validate_request`);
2. `Idempotency-Key`: a retry with the same key and the same request returns the same query
   (a different request under that key is a 409);
3. an identical succeeded query of the tenant: a new `succeeded`, `cached: true` query
   sharing its result (no model load): one select of the model and dataset, one of the
   succeeded query, one INSERT and one INSERT ... SELECT ... RETURNING of its ranked rows,
   one commit; the response is built from those rows (`Submitted.results`), not read back;
4. otherwise the samples are checked against the model (`check_samples_against_model`), the row is
   inserted `queued` and committed, then `workers.jobs.run_query(id)` is enqueued with
   `job_id = id`; if the queue is down the row is marked failed (its Idempotency-Key freed,
   so a retry with the key creates a fresh query) and the answer is 503 `queue_unavailable`.
   A connection lost during the commit answers 503 `commit_unknown` (`service.api.storing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import queue
from service.api.errors import (
    DependencyDown,
)
from service.api.query_validation import (
    ValidatedQuery,
    same_request,
    samples_against_model,
    validate_request,
)
from service.api.schemas import QueryCreate
from service.api.storing import commit_created
from service.db.models import Query
from service.db.repositories import queries as query_repo
from service.settings import Settings

RUN_QUERY_JOB = "workers.jobs.run_query"
RETRY_WITH_KEY = ("retry with the same Idempotency-Key header: it returns the query if it was stored and "
                  "creates it otherwise (without a key a retry may create a duplicate)")


class Outcome(StrEnum):
    ENQUEUED = "enqueued"  # a new job was queued
    CACHED = "cached"  # answered from an identical succeeded query
    REPLAYED = "replayed"  # Idempotency-Key retry: the earlier query is returned


@dataclass(frozen=True)
class Submitted:
    """The query the client is answered with. For `CACHED`, `results` holds the ranked rows
    copied into it, so the answer needs no read-back; otherwise None (read the query again
    after the commit: a worker may already have moved it on)."""

    query: Query
    outcome: Outcome
    results: Sequence[query_repo.RankedRow] | None = None


def submit_query(
    session: Session, settings: Settings, tenant: str, body: QueryCreate, idempotency_key: str | None
) -> Submitted:
    checked = validate_request(session, settings, tenant, body)
    if idempotency_key is not None:
        earlier = query_repo.find_by_idempotency_key(session, tenant, idempotency_key)
        if earlier is not None:
            return Submitted(same_request(earlier, checked, body), Outcome.REPLAYED)

    source = query_repo.find_succeeded(session, tenant, checked.request_hash)
    if source is not None:
        def cached_copy() -> tuple[Query, Sequence[query_repo.RankedRow]]:
            return query_repo.add_cached_copy(
                session, source, tenant=tenant, model_id=checked.model.id, dataset_id=checked.dataset.id,
                samples=checked.samples, idempotency_key=idempotency_key, callback_url=body.callback_url,
            )
        return _insert(session, tenant, idempotency_key, checked, body, Outcome.CACHED, cached_copy)

    num_samples = samples_against_model(session, settings, checked)

    def queued() -> tuple[Query, None]:
        return query_repo.add_query(
            session, tenant=tenant, model_id=checked.model.id, dataset_id=checked.dataset.id,
            method=checked.method, params=checked.params_dict, mode=body.mode,
            self_influence=body.self_influence, top_k=body.top_k, samples=checked.samples,
            num_query_samples=num_samples, request_hash=checked.request_hash,
            idempotency_key=idempotency_key, callback_url=body.callback_url,
            group_by=body.group_by, group_reduce=checked.group_reduce, stability=checked.stability,
            extras={"auto": checked.auto} if checked.auto is not None else None,
        ), None
    submitted = _insert(session, tenant, idempotency_key, checked, body, Outcome.ENQUEUED, queued)
    if submitted.outcome is Outcome.ENQUEUED:
        _enqueue(session, settings, submitted.query)
    return submitted


def _insert(
    session: Session, tenant: str, idempotency_key: str | None, checked: ValidatedQuery, body: QueryCreate,
    outcome: Outcome, create: Callable[[], tuple[Query, Sequence[query_repo.RankedRow] | None]],
) -> Submitted:
    """Insert and commit a new query; if a concurrent request won the same Idempotency-Key,
    return that request's query instead (or 409 if its body differs)."""
    try:
        query, results = create()
        commit_created(session, what="query", recovery=RETRY_WITH_KEY)
    except IntegrityError:
        session.rollback()
        earlier = query_repo.find_by_idempotency_key(session, tenant, idempotency_key) if idempotency_key else None
        if earlier is None:
            raise
        return Submitted(same_request(earlier, checked, body), Outcome.REPLAYED)
    return Submitted(query, outcome, results)


def _enqueue(session: Session, settings: Settings, query: Query) -> None:
    try:
        queue.enqueue(RUN_QUERY_JOB, query.id, job_id=query.id, settings=settings)
    except queue.QueueUnavailable as exc:
        query_repo.fail_unstarted(session, query, f"not started: the job queue is unreachable ({exc})")
        commit_created(session, what="failure of the unqueued query", recovery=RETRY_WITH_KEY)
        raise DependencyDown(f"the job queue is unreachable: query {query.id} was recorded as failed, not run; "
                             "retry later (a retry with the same Idempotency-Key creates a new query)",
                             code="queue_unavailable") from exc
