"""The one place that knows RQ. Jobs are named by import path ("workers.jobs.run_query").

With `REDIS_URL` set, jobs go to the RQ queue for `python -m workers` processes; unset
(embedded mode), they run on a small thread pool inside the API process, each inside
`settings_override(<the enqueuer's settings>)`, so the job's `get_settings()` is the
settings of the app that enqueued it (RQ jobs read theirs from the worker's environment).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from redis import Redis

from service.settings import Settings, get_settings, settings_override

log = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The queue backend (Redis) cannot be reached."""


@lru_cache(maxsize=4)
def redis_connection(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def resolve(path: str) -> Callable[..., Any]:
    """The function at import path `path` ("workers.jobs.run_query"): how the API reaches worker
    code it must run in-process (embedded jobs, the embedded reaper) without importing `workers`."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _InProcessRunner:
    """Embedded-mode executor: a thread pool that runs job functions by import path under
    the settings they were enqueued with."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attribution-job")
        self.pending = 0
        self.lock = threading.Lock()

    def submit(self, path: str, args: tuple[Any, ...], settings: Settings) -> None:
        with self.lock:
            self.pending += 1
        self.pool.submit(self._run, path, args, settings)

    def _run(self, path: str, args: tuple[Any, ...], settings: Settings) -> None:
        try:
            with settings_override(settings):
                resolve(path)(*args)
        except Exception:  # the job function records its own failure; never kill the pool
            log.exception("in-process job %s%r failed", path, args)
        finally:
            with self.lock:
                self.pending -= 1


@lru_cache(maxsize=1)
def _inprocess_runner(workers: int) -> _InProcessRunner:
    return _InProcessRunner(workers)


# RQ's own (hard) job timeout: JOB_TIMEOUT_S plus this grace. The job stops itself at
# JOB_TIMEOUT_S (`workers.stopping`) and fails its query with that reason; RQ's timeout is the
# backstop for a job stuck inside one long operation.
HARD_TIMEOUT_GRACE_S = 60

# The stale-job reaper (`workers.reaper`): its one start-up pass and its periodic thread.
REAP_STALE_QUERIES = "workers.reaper.reap_stale_queries"
START_REAPER = "workers.reaper.start_reaper"

# Called by RQ when a job fails outside the job's own error handling (worker lost, timeout):
# marks the query failed once RQ has no retries left.
FAILURE_CALLBACK = "workers.jobs.on_job_failure"


def enqueue(path: str, *args: Any, job_id: str, settings: Settings | None = None) -> None:
    """Enqueue the job function at `path` with `args`; `job_id` makes re-enqueueing idempotent."""
    settings = settings or get_settings()
    if settings.embedded:
        _inprocess_runner(settings.inprocess_workers).submit(path, args, settings)
        return
    from redis.exceptions import RedisError
    from rq import Callback, Queue, Retry

    try:
        queue = Queue(settings.queue_name, connection=redis_connection(settings.redis_url or ""))
        queue.enqueue(
            path, *args, job_id=job_id, job_timeout=settings.job_timeout_s + HARD_TIMEOUT_GRACE_S,
            retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None,
            result_ttl=3600, failure_ttl=7 * 24 * 3600,
            on_failure=Callback(FAILURE_CALLBACK),
        )
    except RedisError as exc:
        raise QueueUnavailable(f"queue unreachable: {exc.__class__.__name__}") from exc


def cancel(job_id: str, settings: Settings | None = None) -> bool:
    """Stop the RQ job `job_id`: cancel it if waiting, send a stop command if running.

    Returns True if a job was found and canceled or stopped. Embedded mode has no handle on
    in-process jobs: they see the query's `canceled` status and stop on their own.
    """
    settings = settings or get_settings()
    if settings.embedded:
        return False
    from redis.exceptions import RedisError
    from rq.command import send_stop_job_command
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus

    connection = redis_connection(settings.redis_url or "")
    try:
        job = Job.fetch(job_id, connection=connection)
        status = job.get_status()
        if status == JobStatus.STARTED:
            send_stop_job_command(connection, job_id)
            return True
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
            return True
    except (NoSuchJobError, InvalidJobOperation):
        return False
    except RedisError as exc:
        raise QueueUnavailable(f"queue unreachable: {exc.__class__.__name__}") from exc
    return False


def queue_depth(settings: Settings | None = None) -> int:
    """Jobs waiting: RQ queue length, or pending in-process jobs."""
    settings = settings or get_settings()
    if settings.embedded:
        return _inprocess_runner(settings.inprocess_workers).pending
    from rq import Queue

    return len(Queue(settings.queue_name, connection=redis_connection(settings.redis_url or "")))


def ping(settings: Settings | None = None) -> bool:
    settings = settings or get_settings()
    if settings.embedded:
        return True
    try:
        return bool(redis_connection(settings.redis_url or "").ping())
    except Exception:
        return False
