"""Request dependencies: settings, a database session and the caller's tenant.

Routes take them through the `Annotated` aliases `SettingsDep`, `SessionDep`, `TenantDep`.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.api.errors import Unauthorized
from service.settings import Settings

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
    a connection (rollback, return to the pool) runs in the threadpool like the routes.
    """
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(db_session)]


def tenant_for_key(tenants_by_key: dict[str, str], key: str) -> str | None:
    """The tenant owning `key`, compared in constant time against every configured key."""
    found: str | None = None
    for candidate, tenant in tenants_by_key.items():
        if hmac.compare_digest(candidate.encode(), key.encode()):
            found = tenant
    return found


async def caller_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The tenant of the `Authorization: Bearer <key>` header; `default` when auth is off.
    (No I/O: `async` only so FastAPI calls it on the event loop, without a threadpool hop.)"""
    tenants_by_key: dict[str, str] = request.app.state.tenants_by_key
    if not tenants_by_key:
        return ANONYMOUS_TENANT
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise Unauthorized("missing `Authorization: Bearer <api key>` header", headers=challenge)
    tenant = tenant_for_key(tenants_by_key, credentials.credentials)
    if tenant is None:
        raise Unauthorized("unknown API key", headers=challenge)
    return tenant


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
