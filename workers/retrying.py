"""Transient infrastructure errors inside a job: recognised, retried with backoff, never blamed on the query.

A database blip (a connection terminated by an administrator or a failover, a dropped
socket) or a Redis one says nothing about the query: the same work succeeds a moment later.
`with_retries(step)` re-runs one idempotent step of a job — reading and starting the row,
computing, storing the result in one transaction — after 0.5, 1, 2, 4, 8, 8, ... s
(`TRANSIENT_RETRIES` attempts after the first). A step that still fails re-raises: the job
then leaves the row `running`, releases its lease and the reaper (`workers.reaper`)
hands the query to another attempt; the query is failed only for a reason of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from service.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """True for a lost or refused database / Redis connection anywhere in the exception's chain."""
    for error in _chain(exc):
        if isinstance(error, OperationalError | InterfaceError):
            return True
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            return True
    return False


def backoff_delays(retries: int) -> list[float]:
    """The waits before each retry: 0.5 s doubling, capped at 8 s."""
    return [min(FIRST_DELAY_S * 2**n, MAX_DELAY_S) for n in range(max(retries, 0))]


def with_retries(step: Callable[[], T], settings: Settings, *, what: str) -> T:
    """`step()`, re-run after each transient error (`is_transient`) up to `settings.transient_retries`
    times with backoff; any other error, or the last transient one, propagates."""
    for delay in backoff_delays(settings.transient_retries):
        try:
            return step()
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("%s: transient error, retrying in %.1f s: %s", what, delay, exc.__class__.__name__)
        time.sleep(delay)
    return step()
