"""Repositories: every SQL statement of the service, one module per aggregate.

Reads always filter by `tenant` (and hide soft-deleted rows), so another tenant's id is
indistinguishable from an unknown one. Functions add/flush; callers own the commit.
"""

from __future__ import annotations

import re

from sqlalchemy import text
from sqlalchemy.orm import Session

_RESOURCE_ID = re.compile(r"[0-9a-f]{32}")


def is_resource_id(value: str) -> bool:
    """True for ids this service issues (32 lowercase hex); others cannot exist, no query needed."""
    return _RESOURCE_ID.fullmatch(value) is not None


def ping_database(session: Session) -> None:
    """Round trip to the database (`SELECT 1`); raises if it cannot be reached."""
    session.execute(text("SELECT 1"))
