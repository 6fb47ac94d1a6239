"""SQL for attribution queries and their ranked results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    ColumnElement,
    String,
    Table,
    bindparam,
    case,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, defer, lazyload

from service.db.models import Dataset, Model, Query, QueryResult, QueryStatus, utcnow
from service.db.repositories import is_resource_id

_FINAL = [s.value for s in QueryStatus if s.is_final]
_OPEN = [QueryStatus.QUEUED.value, QueryStatus.RUNNING.value]


# The hot statements of repeat queries are built once: constructing a select costs about
# as much CPU as running it on loopback. Values are bound at execution (`bindparam`).
_QUERY = select(Query).where(Query.id == bindparam("query_id"), Query.tenant == bindparam("tenant"))
_QUERY_WITH_RESULTS = _QUERY.options(lazyload(Query.parts))
_QUERY_ALONE = _QUERY.options(lazyload(Query.results), lazyload(Query.parts))
_MODEL_AND_DATASET = (
    select(Model, Dataset).join(Dataset, true())
    .where(Model.id == bindparam("model_id"), Model.tenant == bindparam("tenant"), Model.deleted_at.is_(None),
           Dataset.id == bindparam("dataset_id"), Dataset.tenant == bindparam("tenant"), Dataset.deleted_at.is_(None))
    .options(lazyload(Dataset.shards))
)
_SUCCEEDED = (
    select(Query).where(Query.tenant == bindparam("tenant"), Query.request_hash == bindparam("request_hash"),
                        Query.status == QueryStatus.SUCCEEDED.value)
    .order_by(Query.finished_at.desc()).limit(1)
    .options(lazyload(Query.results), lazyload(Query.parts), defer(Query.samples))
)


def get_query(session: Session, tenant: str, query_id: str, *, with_results: bool = True) -> Query | None:
    """The tenant's query (with its ranked rows unless `with_results` is False), or None.

    Its fan-out parts (and, without `with_results`, its ranked rows) load only if accessed;
    no response shows the parts.
    """
    if not is_resource_id(query_id):
        return None
    stmt = _QUERY_WITH_RESULTS if with_results else _QUERY_ALONE
    return session.scalars(stmt, {"query_id": query_id, "tenant": tenant}).one_or_none()


def model_and_dataset(session: Session, tenant: str, model_id: str, dataset_id: str) -> tuple[Model, Dataset] | None:
    """The tenant's live model and live dataset a query names, in one SELECT; None if either
    is missing (the caller then looks each up alone to tell which).

    The dataset's shards load on first access (`lazyload`), not here.
    """
    if not (is_resource_id(model_id) and is_resource_id(dataset_id)):
        return None
    row = session.execute(_MODEL_AND_DATASET,
                          {"model_id": model_id, "dataset_id": dataset_id, "tenant": tenant}).one_or_none()
    return None if row is None else (row[0], row[1])


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Query | None:
    return session.scalars(
        select(Query).where(Query.tenant == tenant, Query.idempotency_key == key)
        .options(lazyload(Query.results), lazyload(Query.parts))
    ).one_or_none()


def find_succeeded(session: Session, tenant: str, request_hash: str) -> Query | None:
    """The tenant's most recent succeeded query with this request hash: one entry of index
    `ix_queries_request_hash_status`, however many cached answers share the hash.

    Its `samples` are not loaded (`defer`): the caller has the same ones in the request.
    """
    return session.scalars(_SUCCEEDED, {"tenant": tenant, "request_hash": request_hash}).first()


def add_query(session: Session, **fields: Any) -> Query:
    """Insert a new query row (status `queued` unless given)."""
    query = Query(**fields)
    session.add(query)
    session.flush()
    return query


PREVIEW_CHARS = 200


class RankedRow(BaseModel):
    """One ranked row of a query, from the worker's ranking to the stored `QueryResult` columns
    to the API response (which nests it under its `kind` and `sample`, so those two are not
    serialised)."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(exclude=True, description="`top` or `bottom`")
    sample: int = Field(exclude=True, description="the query sample (per_sample mode; 0 otherwise)")
    rank: int
    index: int = Field(description="global row index across the dataset's shards; grouped queries: the group's index")
    sample_id: str | None = Field(description="the row's id from the shard's `ids`; grouped queries: the group id "
                                              "(the shard position for `shard`, the `group` value for `group`)")
    shard: int = Field(description="the row's shard; grouped queries: the shard holding the group's first row")
    score: float
    preview: str | None = Field(default=None, description=f"the first {PREVIEW_CHARS} characters of a text row's "
                                                          "training text (prompt + completion for instruction "
                                                          "rows); null otherwise")
    stability: float | None = Field(default=None, description="share of the stability resamples in which the row is "
                                                              "in the top k (bottom k for bottom rows); null unless "
                                                              "the query asked for `stability`")
    rank_low: int | None = Field(default=None, description="5th percentile of the row's rank over the resamples")
    rank_high: int | None = Field(default=None, description="95th percentile of the row's rank over the resamples")

    @classmethod
    def of_columns(cls, values: Sequence[Any]) -> RankedRow:
        """The row of its `RANKED_COLUMNS` values, in that order."""
        return cls(**dict(zip(RANKED_COLUMNS, values, strict=True)))


RANKED_COLUMNS = tuple(RankedRow.model_fields)


def ranked_rows(query: Query) -> list[RankedRow]:
    """A query's stored ranked rows, ordered by kind, sample and rank (`Query.results`' order)."""
    return [RankedRow.of_columns([getattr(r, name) for name in RANKED_COLUMNS]) for r in query.results]
_RESULTS = cast(Table, QueryResult.__table__)
_RANKED = [_RESULTS.c[name] for name in RANKED_COLUMNS]
_COPY_RANKED = insert(_RESULTS).from_select(  # a Core INSERT: the ORM would read the bound ids as rows
    ["query_id", *RANKED_COLUMNS],
    select(bindparam("copy_id", type_=String(32)), *_RANKED).where(_RESULTS.c.query_id == bindparam("source_id")),
)
_COPY_RANKED_RETURNING = _COPY_RANKED.returning(*_RANKED)


def add_cached_copy(
    session: Session, source: Query, *, tenant: str, model_id: str, dataset_id: str, samples: dict[str, Any] | None,
    idempotency_key: str | None, callback_url: str | None,
) -> tuple[Query, list[RankedRow]]:
    """A new, already `succeeded` query answering from `source`'s stored result, and its
    ranked rows (ordered by kind, sample, rank).

    `samples` are the request's, equal to `source`'s (same request hash), so the source's
    need not be read back.

    The ranked rows are copied with one `INSERT ... SELECT ... RETURNING`, so the caller can
    answer without reading them back; the score file is shared (same `scores_path`), and
    `source_query_id` names the query that computed it. Every column of the new query is
    set here, so none is left to load after the flush.
    """
    now = utcnow()
    copy = Query(
        tenant=tenant, model_id=model_id, dataset_id=dataset_id, method=source.method,
        params=source.params, mode=source.mode, self_influence=source.self_influence, top_k=source.top_k,
        group_by=source.group_by, group_reduce=source.group_reduce, stability=source.stability,
        samples=samples, num_query_samples=source.num_query_samples, request_hash=source.request_hash,
        idempotency_key=idempotency_key, callback_url=callback_url,
        status=QueryStatus.SUCCEEDED.value, progress=1.0, cached=True, error=None, attempts=0,
        created_at=now, started_at=now, finished_at=now, num_scored=source.num_scored, timings=source.timings,
        extras=source.extras, provenance=source.provenance, scores_path=source.scores_path,
        scores_shape=source.scores_shape,
        num_parts=source.num_parts, source_query_id=source.source_query_id or source.id,
    )
    session.add(copy)
    session.flush()
    ids = {"copy_id": copy.id, "source_id": source.id}
    if session.get_bind().dialect.insert_returning:
        returned = session.execute(_COPY_RANKED_RETURNING, ids)
    else:  # SQLite older than 3.35
        session.execute(_COPY_RANKED, ids)
        returned = session.execute(select(*_RANKED).where(_RESULTS.c.query_id == copy.id))
    rows = sorted((RankedRow.of_columns(row) for row in returned), key=lambda r: (r.kind, r.sample, r.rank))
    return copy, rows


def list_queries(
    session: Session, tenant: str, *, limit: int, offset: int,
    status: str | None = None, model_id: str | None = None,
) -> list[Query]:
    """Newest first, without their ranked rows; optional filters by status and model."""
    if model_id is not None and not is_resource_id(model_id):
        return []
    stmt = select(Query).where(Query.tenant == tenant).options(lazyload(Query.results), lazyload(Query.parts))
    if status is not None:
        stmt = stmt.where(Query.status == status)
    if model_id is not None:
        stmt = stmt.where(Query.model_id == model_id)
    stmt = stmt.order_by(Query.created_at.desc(), Query.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(stmt))


def fail_unstarted(session: Session, query: Query, error: str) -> bool:
    """`queued` → `failed` (the job could not be enqueued), freeing its Idempotency-Key so the
    client's retry makes a fresh attempt; False if the query already moved on."""
    result = session.execute(
        update(Query).where(Query.id == query.id, Query.status == QueryStatus.QUEUED.value)
        .values(status=QueryStatus.FAILED.value, error=error, finished_at=utcnow(), idempotency_key=None)
    )
    return _changed(result)


def cancel_open(session: Session, query: Query) -> bool:
    """`queued`/`running` → `canceled` in one conditional UPDATE, so a job finishing at the
    same moment is never overwritten; False (nothing changed) if the query is already final."""
    result = session.execute(
        update(Query).where(Query.id == query.id, Query.status.in_(_OPEN))
        .values(status=QueryStatus.CANCELED.value, error="canceled by the client", finished_at=utcnow())
    )
    return _changed(result)


def _changed(result: Any) -> bool:
    return bool(getattr(result, "rowcount", 0))


# ------------------------------------------------------------------ operations metrics
def count_by_status(session: Session) -> dict[str, int]:
    """Number of queries per status, over every tenant."""
    rows = session.execute(select(Query.status, func.count()).group_by(Query.status))
    return {status: int(count) for status, count in rows}


@dataclass(frozen=True)
class DurationHistogram:
    """Cumulative counts of computed (non-cached) finished jobs with duration <= each bound."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total_seconds: float


def job_durations(session: Session, bounds: Sequence[float]) -> DurationHistogram:
    """Histogram of `finished_at - started_at` of computed jobs, in one aggregate statement."""
    duration = _duration_seconds(session)
    stmt = select(
        func.count(), func.coalesce(func.sum(duration), 0.0),
        *(func.coalesce(func.sum(case((duration <= bound, 1), else_=0)), 0) for bound in bounds),
    ).where(Query.cached.is_(False), Query.status.in_(_FINAL),
            Query.started_at.is_not(None), Query.finished_at.is_not(None))
    row = session.execute(stmt).one()
    return DurationHistogram(bounds=tuple(bounds), cumulative=tuple(int(v) for v in row[2:]),
                             count=int(row[0]), total_seconds=float(row[1]))


def _duration_seconds(session: Session) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Query.finished_at - Query.started_at)
    return (func.julianday(Query.finished_at) - func.julianday(Query.started_at)) * 86400.0
