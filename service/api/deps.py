"""Request dependencies: settings, a database session and the caller's tenant.

Routes take them through the `Annotated` aliases `SettingsDep`, `SessionDep`, `TenantDep`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.errors import Unauthorized
from service.settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS_TENANT = "default"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_bearer = HTTPBearer(auto_error=False, description="API key from API_KEYS (`key:tenant`)")


async def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]


async def db_session(request: Request) -> AsyncIterator[Session]:
    """One session per request; whatever the route did not commit is rolled back on close.

    Opening a session does no I/O, so it happens on the event loop; closing one that holds
    a connection (rollback, return to the pool) runs in the threadpool like the routes, and
    never raises (`_close_quietly`).
    """
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(_close_quietly, session)
        else:
            _close_quietly(session)


def _close_quietly(session: Session) -> None:
    """Close `session`, never raising: this runs after the route, possibly after the response
    has started, when an error (a connection the database terminated: the rollback fails)
    could only abort the response half-sent. The broken connection is discarded instead."""
    try:
        session.close()
    except Exception as exc:
        log.warning("closing a database session failed (%s); its connection is discarded", exc.__class__.__name__)
        try:
            session.invalidate()
        except Exception:
            log.warning("discarding the connection failed too", exc_info=True)


SessionDep = Annotated[Session, Depends(db_session)]


def tenant_for_key(tenants_by_key: dict[str, str], key: str) -> str | None:
    """The tenant owning `key`, compared in constant time against every configured key."""
    found: str | None = None
    for candidate, tenant in tenants_by_key.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = tenant
    return found


def authenticate(tenants_by_key: dict[str, str], authorization: str | None) -> str:
    """The tenant of an `Authorization: Bearer <key>` header value; `default` when auth is off.
    Raises `Unauthorized` (401 with a Bearer challenge) for a missing or unknown key."""
    if not tenants_by_key:
        return ANONYMOUS_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, key = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing `Authorization: Bearer <api key>` header", headers=challenge)
    tenant = tenant_for_key(tenants_by_key, key.strip())
    if tenant is None:
        raise Unauthorized("unknown API key", headers=challenge)
    return tenant


async def caller_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's tenant: the one `AuthFirstMiddleware` found before the body was read (every
    `/v1` request), else from the `Authorization` header (`credentials` documents the scheme
    in the OpenAPI schema). No I/O: `async` only so FastAPI calls it on the event loop."""
    tenant: str | None = getattr(request.state, "tenant", None)
    if tenant is not None:
        return tenant
    return authenticate(request.app.state.tenants_by_key, request.headers.get("authorization"))


TenantDep = Annotated[str, Depends(caller_tenant)]


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="items to skip (the previous page's next_offset)")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


PageDep = Annotated[PageParams, Depends(page_params)]
