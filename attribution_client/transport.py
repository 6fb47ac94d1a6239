"""Connection settings and the retry policy shared by the sync and async clients.

Settings come from arguments, else the environment: `ATTRIBUTION_URL` (default
`http://127.0.0.1:8000`) and `ATTRIBUTION_API_KEY` (sent as `Authorization: Bearer <key>`).

Retries: a request that could not be sent (connection refused) is always retried. A request
whose effect is safe to repeat — GET, DELETE, and `POST /v1/queries`, which carries one
`Idempotency-Key` for all its attempts so the service returns the same query — is also retried
on timeouts and on 429/502/503/504 answers, waiting `Retry-After` when the service sends it,
else `backoff · 2^attempt` seconds (at most `max_backoff`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx

from attribution_client.errors import ApiError, ServiceUnreachable

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "ATTRIBUTION_URL"
API_KEY_ENV = "ATTRIBUTION_API_KEY"
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class ClientConfig:
    """Where the service is and how to talk to it."""

    url: str
    api_key: str | None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None, **options: Any) -> ClientConfig:
        """Arguments first, then `ATTRIBUTION_URL` / `ATTRIBUTION_API_KEY`, then the defaults."""
        return cls(url=(url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/"),
                   api_key=api_key or os.environ.get(API_KEY_ENV) or None, **options)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": "attribution-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.replace(".", "", 1).isdigit():
                return min(float(retry_after), self.max_backoff)
        return float(min(self.backoff * 2**attempt, self.max_backoff))


def may_retry(*, attempt: int, config: ClientConfig, repeatable: bool,
              response: httpx.Response | None = None, error: httpx.HTTPError | None = None) -> bool:
    """Whether attempt number `attempt` (0-based) that ended in `response` or `error` is tried again."""
    if attempt >= config.retries:
        return False
    if error is not None:
        return isinstance(error, httpx.ConnectError) or (repeatable and isinstance(error, httpx.TransportError))
    return response is not None and response.status_code in RETRY_STATUSES and (
        repeatable or response.status_code == 429)


def checked(response: httpx.Response) -> httpx.Response:
    """`response` if it is 2xx/3xx, else `ApiError` from its `{"error", "detail"}` body."""
    if response.status_code < 400:
        return response
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise ApiError(response.status_code, str(body.get("error", "http_error")),
                   str(body.get("detail", response.text[:500] or response.reason_phrase)))


def unreachable(config: ClientConfig, error: httpx.HTTPError) -> ServiceUnreachable:
    return ServiceUnreachable(f"the attribution service at {config.url} did not answer "
                              f"({error.__class__.__name__}: {error}); set {URL_ENV} or pass url=")
