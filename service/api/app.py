"""The application factory: `create_app(settings) -> FastAPI`."""

from __future__ import annotations

from fastapi import FastAPI

from service.api.errors import install_error_handlers
from service.api.metrics import MetricsMiddleware, ServiceMetrics
from service.api.middleware import BodyLimitMiddleware
from service.api.routes import ROUTERS
from service.db.session import session_factory
from service.settings import Settings, get_settings

DESCRIPTION = """Training-data attribution as a service: register a model and its training
shards, submit query samples, get the training rows that most influenced the predictions.

Errors are `{"error": "<machine_code>", "detail": "<human sentence>"}`. Lists are paginated
with `?limit=` (default 50, max 500) and `?offset=`; a page is
`{"items": [...], "limit", "offset", "next_offset"}` (`next_offset` null on the last page).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment).

    The database schema must already be migrated (`alembic upgrade head`, or
    `python -m service`, which migrates the embedded SQLite file at start-up).
    """
    settings = settings or get_settings()
    app = FastAPI(title="Training-data attribution service", version="1.0.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.tenants_by_key = settings.tenants_by_key  # raises at start-up if API_KEYS is malformed
    app.state.sessions = session_factory(settings)
    app.state.metrics = ServiceMetrics(settings, app.state.sessions)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # Added last = outermost: metrics see every request, including refused bodies.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
