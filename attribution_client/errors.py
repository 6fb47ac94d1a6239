"""What the client raises: the service's JSON errors, an unreachable service, failed or slow queries."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attribution_client.models import Query


class AttributionError(Exception):
    """Base of every error the client raises."""


class ApiError(AttributionError):
    """The service answered 4xx/5xx: `status_code`, its machine `error` code and `detail` sentence."""

    def __init__(self, status_code: int, error: str, detail: str) -> None:
        super().__init__(f"{status_code} {error}: {detail}")
        self.status_code = status_code
        self.error = error
        self.detail = detail


class ServiceUnreachable(AttributionError):
    """No answer from the service (connection refused, timeouts) after every retry."""


class QueryFailed(AttributionError):
    """The query ended `failed` or `canceled`; `query` holds its last state (and `error`)."""

    def __init__(self, query: Query) -> None:
        super().__init__(f"query {query.id} {query.status}: {query.error or 'no reason given'}")
        self.query = query


class WaitTimeout(AttributionError, TimeoutError):
    """The query was still not final when `wait(timeout=...)` ran out; `query` is its last state."""

    def __init__(self, query: Query, timeout: float) -> None:
        super().__init__(f"query {query.id} still {query.status} after {timeout:g} s")
        self.query = query
