"""Callbacks: a query's `callback_url` hears `{"id", "status"}` once the query is final."""

from __future__ import annotations

import logging

from service.db.models import QueryStatus
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings
from workers.error_text import one_line

log = logging.getLogger(__name__)


def notify(query_id: str, settings: Settings) -> None:
    """POST `{"id", "status"}` to the query's callback URL, best effort, 5 s timeout."""
    with session_scope(settings) as session:
        query = repo.get_query(session, query_id)
        if query is None or not query.callback_url or not QueryStatus(query.status).is_final:
            return
        url, status = query.callback_url, query.status
    try:
        import httpx

        httpx.post(url, json={"id": query_id, "status": status}, timeout=5.0)
    except Exception as exc:
        log.warning("callback for query %s to %s failed: %s", query_id, url, one_line(exc))
