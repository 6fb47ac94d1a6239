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

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 whenever the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database or queue unreachable"}})
def readyz(request: Request, settings: SettingsDep) -> JSONResponse:
    """200 when the database answers `SELECT 1` and the queue answers a ping; 503 naming what is down."""
    checks = {"database": _database_ok(request), "queue": queue.ping(settings)}
    states = {name: "ok" if ok else "unreachable" for name, ok in checks.items()}
    down = [name for name, ok in checks.items() if not ok]
    if down:
        detail = f"not ready: {' and '.join(down)} unreachable"
        return JSONResponse(error_body("not_ready", detail, checks=states), status_code=503)
    return JSONResponse({"status": "ready", "checks": states})


def _database_ok(request: Request) -> bool:
    try:
        with request.app.state.sessions() as session:
            ping_database(session)
    except Exception as exc:
        log.warning("readiness: database unreachable (%s)", exc.__class__.__name__)
        return False
    return True


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    registry: ServiceMetrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
