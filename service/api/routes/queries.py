"""`/v1/queries`: submit attribution jobs, poll them, read scores, list, cancel."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi import Query as QueryParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy.orm import Session

from service import queue
from service.api import scores as score_files
from service.api.deps import PageDep, SessionDep, SettingsDep, TenantDep
from service.api.errors import Conflict, NotFound
from service.api.estimate_schemas import QueryEstimate
from service.api.estimates import estimate_query
from service.api.metrics import ServiceMetrics
from service.api.schemas import Page, QueryCreate, QueryOut, page_of, query_out
from service.api.storing import DATABASE_ERRORS
from service.api.submission import Outcome, submit_query
from service.db.models import Query, QueryStatus
from service.db.repositories import queries as query_repo

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/queries", tags=["queries"])

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=256, pattern=r"^[!-~]+$",
           description="a retried POST with the same key returns the same query"),
]


def _owned(session: Session, tenant: str, query_id: str, *, with_results: bool = True) -> Query:
    query = query_repo.get_query(session, tenant, query_id, with_results=with_results)
    if query is None:
        raise NotFound(f"query {query_id} not found", code="query_not_found")
    return query


def _json(body: QueryOut, *, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`body` as JSON, serialised once by pydantic. Returning a `Response` skips FastAPI's
    re-validation of a returned model, which for a sync route costs a threadpool hop of
    its own; the bytes are the same (`response_model` still documents the schema)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json", headers=headers)


DryRun = Annotated[bool, QueryParam(
    description="validate exactly as a real POST (same 4xx errors) but store and enqueue nothing: 200 with the "
                "predicted seconds, peak memory and rows × passes (`QueryEstimate`)")]


@router.post("", status_code=202, response_model=QueryOut, responses={
    200: {"model": QueryEstimate, "description": "dry_run=true: the predicted cost; nothing was stored"},
})
def create_query(
    body: QueryCreate, request: Request, settings: SettingsDep, session: SessionDep,
    tenant: TenantDep, idempotency_key: IdempotencyKey = None, dry_run: DryRun = False,
) -> Response:
    """Submit a query: 202 with `Location`. An identical earlier succeeded query answers at once
    (a new id, already `succeeded`, `cached: true`); an Idempotency-Key retry returns the same id.
    `?dry_run=true`: 200 with the cost estimate, nothing stored or enqueued."""
    if dry_run:
        predicted = estimate_query(session, settings, tenant, body, idempotency_key)
        session.rollback()  # nothing was written; end the read transaction
        return Response(predicted.model_dump_json(), status_code=200, media_type="application/json")
    submitted = submit_query(session, settings, tenant, body, idempotency_key)
    metrics: ServiceMetrics = request.app.state.metrics
    if submitted.outcome is Outcome.CACHED:
        metrics.result_cache_hits.inc()
    elif submitted.outcome is Outcome.ENQUEUED:
        metrics.result_cache_misses.inc()
    query_id = submitted.query.id
    if submitted.results is not None:  # a cached answer: final, every field and ranked row in hand
        out = query_out(submitted.query, results=submitted.results)
    else:
        out = _latest(session, tenant, submitted.query)
    return _json(out, status_code=202, headers={"Location": f"/v1/queries/{query_id}"})


def _latest(session: Session, tenant: str, query: Query) -> QueryOut:
    """The committed query as stored now (a worker may already have moved a queued query on);
    if the database fails on that re-read, the query as committed: it exists, so the answer
    must carry it, never a 503 that would make the client submit it again."""
    committed = query_out(query, results=[] if query.status != QueryStatus.SUCCEEDED.value else None)
    try:
        session.expire_all()
        return query_out(_owned(session, tenant, query.id))
    except DATABASE_ERRORS as exc:
        log.warning("query %s: re-reading it after the commit failed (%s); answering with the committed row",
                    query.id, exc.__class__.__name__)
        return committed


@router.get("", response_model=Page[QueryOut])
def list_queries(
    page: PageDep, session: SessionDep, tenant: TenantDep,
    status: Annotated[QueryStatus | None, QueryParam(description="only queries in this status")] = None,
    model_id: Annotated[str | None, QueryParam(max_length=64, description="only queries of this model")] = None,
) -> Page[QueryOut]:
    """The tenant's queries, newest first; items carry `result: null` (GET one for the ranking)."""
    rows = query_repo.list_queries(session, tenant, limit=page.limit + 1, offset=page.offset,
                                   status=status.value if status else None, model_id=model_id)
    return page_of([query_out(q, with_result=False) for q in rows], limit=page.limit, offset=page.offset)


@router.get("/{query_id}", response_model=QueryOut)
def get_query(query_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    return _json(query_out(_owned(session, tenant, query_id)))


@router.get("/{query_id}/scores", response_model=None, responses={
    200: {"description": "json: {query_id, shape, scores} (+ groups: the column group ids of grouped queries); "
                         "csv: index,score or index,sample_0,... (grouped: index,group,...; with `stability`: "
                         "stability,rank_low,rank_high (per_sample: _q per sample), filled for the ranked rows; "
                         "text datasets: a last column preview, filled for the ranked rows); npy: float32 array"},
})
def get_scores(
    query_id: str, settings: SettingsDep, session: SessionDep, tenant: TenantDep,
    format: Annotated[Literal["json", "csv", "npy"], QueryParam(description="response format")] = "json",
) -> Response:
    """The full score vector `[N]` (or `[Q, N]` in per_sample mode) in global row order; 409 until succeeded.
    Grouped queries (`group_by` shard/group): `[G]` (or `[Q, G]`) group scores in group order."""
    query = _owned(session, tenant, query_id, with_results=format == "csv")
    path = score_files.score_file(settings, query)
    if format == "npy":
        return FileResponse(path, media_type="application/octet-stream", filename=f"{query_id}.npy")
    scores = score_files.load_scores(path)
    groups = score_files.group_labels(path, scores)
    if format == "csv":
        previews = {row.index: row.preview for row in query.results if row.preview is not None}
        stability = score_files.stability_cells(query_repo.ranked_rows(query))
        return StreamingResponse(score_files.scores_csv(scores, groups, previews, stability), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{query_id}.csv"'})
    return JSONResponse(score_files.scores_json(query_id, scores, groups))


@router.delete("/{query_id}", response_model=QueryOut)
def cancel_query(query_id: str, settings: SettingsDep, session: SessionDep, tenant: TenantDep) -> QueryOut:
    """Cancel a queued or running query (200 with its body; repeating it is harmless).
    A succeeded or failed query cannot be canceled: 409."""
    query = _owned(session, tenant, query_id)
    if query_repo.cancel_open(session, query):
        session.commit()
        try:
            queue.cancel(query.id, settings)
        except queue.QueueUnavailable as exc:  # the worker re-reads the row and skips it
            log.warning("could not cancel job %s in the queue: %s", query.id, exc)
    session.expire_all()
    query = _owned(session, tenant, query_id)
    if query.status != QueryStatus.CANCELED.value:
        raise Conflict(f"query {query_id} already {query.status}; only queued or running queries can be canceled",
                       code="query_finished")
    return query_out(query)
