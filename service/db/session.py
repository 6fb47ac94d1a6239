"""Engine and session factory, one per process, for SQLite (embedded) or Postgres."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings, get_settings


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, **kwargs)
    _watch_connection_errors(engine)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    return engine


_LAST_CONNECTION_ERROR: dict[str, float] = {}  # engine URL → time.monotonic() of its last failed statement


def _watch_connection_errors(engine: Engine) -> None:
    """Record when a statement on `engine` fails for lack of a working connection (a connection
    the server terminated, a refused connect); a pre-ping that finds a dead pooled connection
    and replaces it is not a failure (the statement then runs)."""
    key = engine.url.render_as_string(hide_password=False)

    @event.listens_for(engine, "handle_error")
    def _record(context: Any) -> None:
        if context.is_pre_ping:
            return
        if context.is_disconnect or isinstance(context.sqlalchemy_exception, OperationalError | InterfaceError):
            _LAST_CONNECTION_ERROR[key] = time.monotonic()


def seconds_since_connection_error(settings: Settings | None = None) -> float | None:
    """Seconds since a statement of this process last failed on a database connection; None if never."""
    at = _LAST_CONNECTION_ERROR.get(get_engine(settings).url.render_as_string(hide_password=False))
    return None if at is None else time.monotonic() - at


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    if settings.database_url is None:
        settings.service_dir.mkdir(parents=True, exist_ok=True)
    return _engine_for(settings.effective_database_url)


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def create_embedded_schema(settings: Settings) -> None:
    """Embedded mode only: bring the SQLite file to the latest Alembic revision."""
    from service.db.migrate import upgrade_head

    upgrade_head(settings)


def relaxed_commit(session: Session) -> None:
    """Let this transaction commit without waiting for the WAL flush (Postgres `synchronous_commit`).

    For bookkeeping that may be lost in a database crash without harm (a part marked
    `running`, progress): the lease, not the row, proves a part is alive, and the next
    durable commit (`finish_part`) flushes the WAL up to and including this one.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
