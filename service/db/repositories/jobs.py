"""Worker-side SQL: the state transitions of a query (and its fan-out parts) while a job runs.

Transitions are conditional UPDATEs (`... WHERE status = 'running'`), so a job never
overwrites a final status set meanwhile (a client's cancel, another attempt's result), and
the first statement of each write transaction is a write: Postgres takes the row lock at
once and SQLite (WAL) never has to upgrade a stale read snapshot. Functions flush; the
caller's `session_scope` commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session, noload

from service.db.models import Dataset, Model, Query, QueryPart, QueryResult, QueryStatus, utcnow
from service.db.repositories.queries import RANKED_COLUMNS, RankedRow

_OPEN = (QueryStatus.QUEUED.value, QueryStatus.RUNNING.value)
_RUNNING = QueryStatus.RUNNING.value


@dataclass(frozen=True)
class QueryOutcome:
    rows: Sequence[RankedRow]
    num_scored: int
    scores_path: str
    scores_shape: Sequence[int]
    timings: dict[str, Any]
    extras: dict[str, Any]
    provenance: dict[str, Any] | None = None


def get_query(session: Session, query_id: str) -> Query | None:
    """The query row by id (any tenant: jobs are addressed by id only), without its results."""
    return session.scalar(select(Query).where(Query.id == query_id).options(noload(Query.results), noload(Query.parts)))


def query_status(session: Session, query_id: str) -> str | None:
    return session.scalar(select(Query.status).where(Query.id == query_id))


def model_and_dataset(session: Session, query: Query) -> tuple[Model | None, Dataset | None]:
    """The query's model and dataset rows (even if soft-deleted after submission)."""
    return session.get(Model, query.model_id), session.get(Dataset, query.dataset_id)


def tenant_models(session: Session, tenant: str, model_ids: Sequence[str]) -> dict[str, Model]:
    """The tenant's live models among `model_ids` (checkpoints of multi-checkpoint methods)."""
    rows = session.scalars(select(Model).where(Model.id.in_(list(model_ids)), Model.tenant == tenant,
                                               Model.deleted_at.is_(None)))
    return {m.id: m for m in rows}


def start_attempt(session: Session, query_id: str) -> bool:
    """`queued`/`running` → `running`, attempts + 1, fresh `started_at`; False if the query is final."""
    result = session.execute(
        update(Query).where(Query.id == query_id, Query.status.in_(_OPEN))
        .values(status=_RUNNING, attempts=Query.attempts + 1, started_at=utcnow(), error=None, progress=0.0)
    )
    return _changed(result)


def set_progress(session: Session, query_id: str, progress: float) -> str | None:
    """Record progress of a running query; returns its current status (to notice a cancel)."""
    session.execute(update(Query).where(Query.id == query_id, Query.status == _RUNNING).values(progress=progress))
    return query_status(session, query_id)


def mark_failed(session: Session, query_id: str, error: str) -> bool:
    """`queued`/`running` → `failed` with a one-line error; False if already final."""
    result = session.execute(
        update(Query).where(Query.id == query_id, Query.status.in_(_OPEN))
        .values(status=QueryStatus.FAILED.value, error=error[:2000], finished_at=utcnow())
    )
    return _changed(result)


def requeue(session: Session, query_id: str) -> bool:
    """`running` → `queued` (the reaper hands a lost job to another worker)."""
    result = session.execute(update(Query).where(Query.id == query_id, Query.status == _RUNNING)
                             .values(status=QueryStatus.QUEUED.value))
    return _changed(result)


def complete(session: Session, query_id: str, outcome: QueryOutcome) -> bool:
    """`running` → `succeeded` with the ranked rows, in the caller's one transaction.

    Returns False (and writes nothing) if the query is no longer running (canceled, or
    another attempt finished first).
    """
    now = utcnow()
    result = session.execute(
        update(Query).where(Query.id == query_id, Query.status == _RUNNING).values(
            status=QueryStatus.SUCCEEDED.value, progress=1.0, error=None, finished_at=now,
            num_scored=outcome.num_scored, scores_path=outcome.scores_path,
            scores_shape={"shape": [int(n) for n in outcome.scores_shape]},
            timings=dict(outcome.timings), extras=dict(outcome.extras), provenance=outcome.provenance,
        )
    )
    if not _changed(result):
        return False
    session.execute(delete(QueryResult).where(QueryResult.query_id == query_id))
    if outcome.rows:
        session.execute(insert(QueryResult), [
            {"query_id": query_id, **{name: getattr(r, name) for name in RANKED_COLUMNS}} for r in outcome.rows
        ])
    return True


# ----------------------------------------------------------------------------- fan-out parts
def ensure_parts(session: Session, query_id: str, ranges: Sequence[tuple[int, int]]) -> list[QueryPart]:
    """The query's parts, created from `ranges` (`[row_start, row_stop)` each) on first call."""
    existing = parts_of(session, query_id)
    if existing:
        return existing
    session.execute(update(Query).where(Query.id == query_id).values(num_parts=len(ranges)))
    session.execute(insert(QueryPart), [
        {"query_id": query_id, "part": i, "row_start": lo, "row_stop": hi, "status": QueryStatus.QUEUED.value,
         "progress": 0.0} for i, (lo, hi) in enumerate(ranges)
    ])
    return parts_of(session, query_id)


def parts_of(session: Session, query_id: str) -> list[QueryPart]:
    return list(session.scalars(select(QueryPart).where(QueryPart.query_id == query_id).order_by(QueryPart.part)))


def get_part(session: Session, query_id: str, part: int) -> QueryPart | None:
    return session.scalar(select(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part))


def start_part(session: Session, query_id: str, part: int) -> bool:
    """A part → `running` unless it already succeeded; False also when the query itself is final."""
    result = session.execute(
        update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part,
                                QueryPart.status != QueryStatus.SUCCEEDED.value)
        .values(status=_RUNNING, progress=0.0, error=None)
    )
    return _changed(result) and query_status(session, query_id) == _RUNNING


def set_part_progress(session: Session, query_id: str, part: int, progress: float) -> str | None:
    """Record a part's progress; the query's progress becomes the mean over its parts. Returns the query status."""
    session.execute(update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part)
                    .values(progress=progress))
    mean = select(func.avg(QueryPart.progress)).where(QueryPart.query_id == query_id).scalar_subquery()
    session.execute(update(Query).where(Query.id == query_id, Query.status == _RUNNING).values(progress=mean))
    return query_status(session, query_id)


def finish_part(session: Session, query_id: str, part: int, scores_path: str) -> bool:
    """Mark a part succeeded; True for the caller that finished the last open part (it merges).

    The query row is locked first on Postgres (`SELECT ... FOR UPDATE`), so concurrent parts
    finishing at once are serialised and exactly one sees no open part left; SQLite
    serialises the writing transactions itself.
    """
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(Query.id).where(Query.id == query_id).with_for_update())
    session.execute(update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part)
                    .values(status=QueryStatus.SUCCEEDED.value, progress=1.0, scores_path=scores_path))
    open_parts = session.scalar(select(func.count()).select_from(QueryPart).where(
        QueryPart.query_id == query_id, QueryPart.status != QueryStatus.SUCCEEDED.value))
    return open_parts == 0 and query_status(session, query_id) == _RUNNING


def fail_part(session: Session, query_id: str, part: int, error: str) -> None:
    session.execute(update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part)
                    .values(status=QueryStatus.FAILED.value, error=error[:2000]))


def requeue_part(session: Session, query_id: str, part: int) -> None:
    session.execute(update(QueryPart).where(QueryPart.query_id == query_id, QueryPart.part == part,
                                            QueryPart.status != QueryStatus.SUCCEEDED.value)
                    .values(status=QueryStatus.QUEUED.value))


def count_attempt(session: Session, query_id: str) -> int:
    """attempts + 1 for a re-run of part of the query; the new count."""
    session.execute(update(Query).where(Query.id == query_id).values(attempts=Query.attempts + 1))
    return int(session.scalar(select(Query.attempts).where(Query.id == query_id)) or 0)


# ----------------------------------------------------------------------------- reaper
def open_queries(session: Session, *, created_before: datetime | None = None) -> list[Query]:
    """Queries still `queued` or `running` (optionally only those created before a time), oldest first."""
    stmt = select(Query).where(Query.status.in_(_OPEN)).options(noload(Query.results), noload(Query.parts))
    if created_before is not None:
        stmt = stmt.where(Query.created_at < created_before)
    return list(session.scalars(stmt.order_by(Query.created_at)))


def _changed(result: Any) -> bool:
    return bool(getattr(result, "rowcount", 0))

