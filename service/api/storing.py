"""Committing a row a POST creates, and answering truthfully when the database fails there.

A database error before the commit means nothing was stored: the generic handler's
`503 database_unavailable` is then accurate. A connection lost *during* the commit leaves
the outcome unknown (the server may have committed before the connection died), so the
answer is `503 commit_unknown`, which says so and how to recover — for queries, retrying
with the same `Idempotency-Key` returns the stored query if there is one and creates it
otherwise. After a successful commit nothing may answer 503 for the same request: the row
exists, so the route answers with it (`service.api.routes.queries`).
"""

from __future__ import annotations

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from service.api.errors import DependencyDown

DATABASE_ERRORS = (OperationalError, InterfaceError)


def commit_created(session: Session, *, what: str, recovery: str) -> None:
    """Commit the new `what`; a database error during the commit → 503 `commit_unknown`
    whose detail ends with `recovery` (how the client finds out or retries safely)."""
    try:
        session.commit()
    except DATABASE_ERRORS as exc:
        raise DependencyDown(
            f"the database connection was lost while storing the {what}: it may or may not have been "
            f"stored; {recovery}", code="commit_unknown") from exc
