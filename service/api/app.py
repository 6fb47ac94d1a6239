"""The application factory: `create_app(settings) -> FastAPI`.

In embedded mode (no `REDIS_URL`) jobs run inside the API process, so the app's lifespan
also does the queue worker's housekeeping: at start-up one reaper pass with
`startup=True` (queries a previous, dead process left `queued` or `running` are
re-enqueued, or failed once out of attempts), then the periodic reaper thread until
shutdown (`workers.reaper`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import queue
from service.api.errors import install_error_handlers
from service.api.metrics import MetricsMiddleware, ServiceMetrics
from service.api.middleware import AuthFirstMiddleware, BodyLimitMiddleware
from service.api.routes import ROUTERS
from service.db.session import session_factory
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """Training-data attribution as a service: register a model and its training
shards, submit query samples, get the training rows that most influenced the predictions.

Group attribution: a query's `group_by` is `row` (default: one score per training row),
`shard` (one score per shard) or `group` (one per value of the shards' optional `group`
column; 422 if a shard has none), combining row scores by `group_reduce` (`mean`, default,
or `sum`). A grouped result ranks groups: `index` is the group's index (the shard position,
or the position of the group id among the sorted distinct ids: numerically when all are
integers, else as text), `sample_id` the group id as a string, `shard` the shard holding the
group's first row; `num_scored` still counts rows. `/scores` returns `[G]` (or `[Q, G]`
per_sample) group scores, with the group ids (`groups` in JSON, a `group` column in CSV).

Multi-checkpoint TracIn / TRAK: `params.checkpoint_model_ids` (registered models of the
same task and architecture, in order) and `params.checkpoint_lrs` (their learning rates,
one per id, finite and > 0).

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
    app = FastAPI(title="Training-data attribution service", version="1.0.0", description=DESCRIPTION,
                  lifespan=_lifespan)
    app.state.settings = settings
    app.state.tenants_by_key = settings.tenants_by_key  # raises at start-up if API_KEYS is malformed
    app.state.sessions = session_factory(settings)
    app.state.metrics = ServiceMetrics(settings, app.state.sessions)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # Added last = outermost: metrics see every request, including refused ones; the key is
    # checked before the body is read (and buffered by the size limit).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AuthFirstMiddleware, tenants_by_key=app.state.tenants_by_key)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    stop = _start_embedded_reaper(app.state.settings)
    try:
        yield
    finally:
        stop()


def _start_embedded_reaper(settings: Settings) -> Callable[[], None]:
    """Embedded mode: reap what a previous process left behind, then start the periodic
    reaper thread; returns the function that stops it (a no-op with a queue)."""
    if not settings.embedded:
        return lambda: None
    reap_stale_queries, start_reaper = queue.resolve(queue.REAP_STALE_QUERIES), queue.resolve(queue.START_REAPER)
    try:
        reap_stale_queries(settings, startup=True)
    except Exception:  # the API still starts; /readyz reports a database that does not answer
        log.exception("start-up reaper pass failed")
    stop = threading.Event()
    thread = start_reaper(settings, stop)

    def halt() -> None:
        stop.set()
        thread.join(timeout=5)

    return halt
