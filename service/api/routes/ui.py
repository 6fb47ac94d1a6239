"""`/ui`: the result pages, server-rendered HTML behind the API's auth (same Bearer keys)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Query as QueryParam
from fastapi.responses import HTMLResponse

from service.api.deps import PageDep, SessionDep, SettingsDep, TenantDep
from service.api.errors import NotFound
from service.api.ui import pages
from service.db.models import QueryStatus
from service.db.repositories import queries as query_repo

router = APIRouter(prefix="/ui", tags=["ui"])


@router.get("/queries", response_class=HTMLResponse)
def queries_page(
    page: PageDep, session: SessionDep, tenant: TenantDep,
    status: Annotated[QueryStatus | None, QueryParam(description="only queries in this status")] = None,
) -> HTMLResponse:
    """The tenant's recent queries, newest first, each linking to its page."""
    rows = query_repo.list_queries(session, tenant, limit=page.limit + 1, offset=page.offset,
                                   status=status.value if status else None, model_id=None)
    more = len(rows) > page.limit
    return HTMLResponse(pages.list_page(rows[:page.limit], limit=page.limit, offset=page.offset,
                                        next_offset=page.offset + page.limit if more else None,
                                        status=status.value if status else None))


@router.get("/queries/{query_id}", response_class=HTMLResponse)
def query_page(
    query_id: str, settings: SettingsDep, session: SessionDep, tenant: TenantDep,
    sample: Annotated[int, QueryParam(ge=0, le=1_000_000, description="per_sample mode: the sample shown")] = 0,
) -> HTMLResponse:
    """One query: parameters and provenance, top and bottom rows with previews, the score histogram."""
    query = query_repo.get_query(session, tenant, query_id)
    if query is None:
        raise NotFound(f"query {query_id} not found", code="query_not_found")
    return HTMLResponse(pages.query_page(session, settings, query, sample))
