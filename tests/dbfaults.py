"""Terminating the test database's connections at a chosen statement, as an administrator
(or a failover) would: `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname =
current_database() AND pid <> pg_backend_pid()`, run on a separate connection. The fault is
real (the server drops every other connection of the test database); only its moment is
chosen, by watching the statements an engine runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event, text

TERMINATE_OTHERS = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")

Fires = Callable[[str, Any], bool]


@contextmanager
def terminate_backends_when(engine: Engine, fires: Fires, *,
                            moment: Literal["before", "after"] = "before") -> Iterator[list[str]]:
    """Once, just before (or after) `engine` runs a statement for which `fires(statement, params)`
    is true, terminate every other connection to its database: the statement (or the next
    one on that connection, e.g. the commit) then fails. Yields the statements that fired."""
    admin = create_engine(engine.url, isolation_level="AUTOCOMMIT")
    fired: list[str] = []

    def watch(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if fired or not fires(statement, params):
            return
        fired.append(statement)
        with admin.connect() as c:
            c.execute(text(TERMINATE_OTHERS))

    name = f"{moment}_cursor_execute"
    event.listen(engine, name, watch)
    try:
        yield fired
    finally:
        event.remove(engine, name, watch)
        admin.dispose()


def sets_status(value: str) -> Fires:
    """An `UPDATE queries SET status = <value> ...` statement."""
    return lambda statement, params: (statement.startswith("UPDATE queries SET status")
                                      and isinstance(params, dict) and params.get("status") == value)


def starts_with(prefix: str) -> Fires:
    return lambda statement, params: statement.startswith(prefix)


def after_a(first: str, then: str) -> Fires:
    """The first statement starting with `then` once one starting with `first` has run."""
    seen: list[bool] = []

    def fires(statement: str, params: Any) -> bool:
        if statement.startswith(first):
            seen.append(True)
            return False
        return bool(seen) and statement.startswith(then)

    return fires
