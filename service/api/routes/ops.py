"""Operations endpoints: liveness, readiness (database and queue), Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import queue
from service.api.deps import SettingsDep
from service.api.errors import error_body
from service.api.metrics import ServiceMetrics
from service.db.repositories import ping_database
from service.db.session import seconds_since_connection_error
from service.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 whenever the process serves requests."""
    return {"status": "ok"}


# A database whose connections failed a statement this recently is not ready, even if a
# fresh connection answers `SELECT 1` now (connections being terminated, a failover).
READY_AFTER_CONNECTION_ERROR_S = 5.0


@router.get("/readyz", responses={503: {"description": "database or queue unreachable or failing"}})
def readyz(request: Request, settings: SettingsDep) -> JSONResponse:
    """200 when the database answers `SELECT 1` and no statement of this process failed on a
    database connection in the last 5 s, and the queue answers a ping; else 503 naming what
    is `unreachable` (no answer now) or `failing` (connections failed moments ago)."""
    states = {"database": _database_state(request, settings), "queue": "ok" if queue.ping(settings) else "unreachable"}
    down = [f"{name} {state}" for name, state in states.items() if state != "ok"]
    if down:
        detail = f"not ready: {' and '.join(down)}"
        return JSONResponse(error_body("not_ready", detail, checks=states), status_code=503)
    return JSONResponse({"status": "ready", "checks": states})


def _database_state(request: Request, settings: Settings) -> str:
    try:
        with request.app.state.sessions() as session:
            ping_database(session)
    except Exception as exc:
        log.warning("readiness: database unreachable (%s)", exc.__class__.__name__)
        return "unreachable"
    since = seconds_since_connection_error(settings)
    return "failing" if since is not None and since < READY_AFTER_CONNECTION_ERROR_S else "ok"


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    registry: ServiceMetrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
