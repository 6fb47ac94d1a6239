"""The stale-job reaper: no query stays `queued` or `running` forever.

Rules (`reap_stale_queries`), per open query:
- `running`, single job: alive while its lease `query:<id>` is held (renewed every
  `ttl/3` s by the job's thread). No lease → its worker died.
- `running`, fanned out: alive while any part holds its lease `part:<id>:<k>`, or a part
  still `queued` has a pending RQ job (queued, started, scheduled, deferred).
- `queued`, older than the grace period (`2 × lease ttl`, at least 30 s; covers the gap
  between the API's commit and its enqueue): alive while its RQ job is pending. Embedded
  mode (in-process pool) cannot see its queue, so queued rows are only re-enqueued with
  `startup=True` (the process just started: its queue is empty), when leases are
  also ignored (a single embedded process holds none yet).
A dead query is re-enqueued (`run_query`, which resumes fanned-out queries part by part)
while `attempts < job_retries + 1`, else marked `failed` with "worker lost ...". Duplicate
deliveries are harmless: the job no-ops on a final row or a held lease.

`python -m workers` runs the reaper at start-up and then every `reaper_interval_s` seconds
on a daemon thread (`start_reaper`); the embedded API can do the same.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from service import queue
from service.db.models import Query, QueryStatus, utcnow
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings
from workers.fanout_plan import part_job_id
from workers.leases import Leases, leases
from workers.notifications import notify

log = logging.getLogger(__name__)

RUN_QUERY_JOB = "workers.jobs.run_query"
_PENDING_RQ = ("queued", "started", "scheduled", "deferred")


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def reap_stale_queries(settings: Settings, *, startup: bool = False) -> ReapReport:
    """Re-enqueue or fail queries whose worker is gone (see the module docstring for the rules)."""
    store = leases(settings)
    ignore_leases = startup and settings.embedded
    grace = timedelta(seconds=max(2 * settings.worker_lease_ttl_s, 30))
    report = ReapReport()
    with session_scope(settings) as session:
        candidates = repo.open_queries(session)
        parts = {q.id: repo.parts_of(session, q.id) for q in candidates if q.num_parts > 1}
    now = utcnow()
    for query in candidates:
        if query.status == QueryStatus.QUEUED.value:
            if settings.embedded and not startup:
                continue
            if not settings.embedded and (now - query.created_at < grace or _rq_pending(query.id, settings)):
                continue
        elif not ignore_leases and _running_alive(query, parts.get(query.id, []), store, settings):
            continue
        _recover(query, settings, report)
    if report.requeued or report.failed:
        log.warning("reaper: re-enqueued %s, failed %s", report.requeued, report.failed)
    return report


def _running_alive(query: Query, parts: list, store: Leases, settings: Settings) -> bool:
    if store.alive(f"query:{query.id}"):
        return True
    for part in parts:
        if part.status == QueryStatus.RUNNING.value and store.alive(f"part:{query.id}:{part.part}"):
            return True
        if part.status == QueryStatus.QUEUED.value and (settings.embedded or _rq_pending(part_job_id(query.id, part.part), settings)):
            return True
    return False


def _rq_pending(job_id: str, settings: Settings) -> bool:
    """True if RQ still has the job waiting or running."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=queue.redis_connection(settings.redis_url or ""))
    except NoSuchJobError:
        return False
    status = job.get_status()
    return getattr(status, "value", status) in _PENDING_RQ


def _recover(query: Query, settings: Settings, report: ReapReport) -> None:
    max_attempts = settings.job_retries + 1
    if query.attempts >= max_attempts:
        error = f"worker lost: the job stopped without finishing after {query.attempts} attempt(s)"
        with session_scope(settings) as session:
            failed = repo.mark_failed(session, query.id, error)
        if failed:
            report.failed.append(query.id)
            notify(query.id, settings)
        return
    with session_scope(settings) as session:
        if query.status == QueryStatus.RUNNING.value and not repo.requeue(session, query.id):
            return  # it finished meanwhile
    try:
        queue.enqueue(RUN_QUERY_JOB, query.id, job_id=query.id, settings=settings)
    except queue.QueueUnavailable:
        log.warning("reaper: queue unreachable, query %s stays queued", query.id)
        return
    report.requeued.append(query.id)


def start_reaper(settings: Settings, stop: threading.Event, *, interval_s: float | None = None) -> threading.Thread:
    """Run `reap_stale_queries` every `interval_s` (default `settings.reaper_interval_s`) until `stop` is set."""
    interval = float(interval_s if interval_s is not None else settings.reaper_interval_s)

    def loop() -> None:
        while not stop.wait(interval):
            try:
                reap_stale_queries(settings)
            except Exception:
                log.exception("reaper pass failed; retrying in %.0f s", interval)

    thread = threading.Thread(target=loop, name="stale-job-reaper", daemon=True)
    thread.start()
    return thread
