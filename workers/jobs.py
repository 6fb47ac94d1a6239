"""RQ job functions (importable paths, called with the query id; see DESIGN.md "One query").

`run_query(query_id)`: re-fetch the row; nothing to do if it is final (duplicate deliveries
and RQ retries are harmless) or if another live worker holds its lease; else mark it
`running` (attempts + 1), load model, rows and samples, run the method with a throttled
progress writer that also stops the job on a cancel, a lost lease or `JOB_TIMEOUT_S`
(`workers.stopping`), write the score file and, in one transaction, the ranked rows and
`succeeded`. A transient database/Redis error retries the step (`workers.retrying`); any
other error marks the query `failed` with a one-line `Class: message` (the traceback goes
to the log); nothing partial is written.
Large datasets fan out when the method allows it (`workers.fanout_plan`, `workers.fanout`):
`run_query_part` / `merge_query`. A joint query whose method batches (`batch_key`; Forward-INF)
also claims compatible queued queries and sweeps once for all of them (`workers.batching`).

`on_job_failure` is RQ's failure callback (see `service.queue.enqueue`): when RQ gives up
on a job that died outside this code (worker lost, hard timeout), it fails the query —
unless the error was a transient database/Redis one, which the reaper retries.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from service.db.models import Dataset, Model, Query, QueryStatus
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings, get_settings
from workers.batching import Member, claim_companions, notify_all, run_batch
from workers.compute import compute_scores
from workers.error_text import one_line
from workers.fanout import dispatch_parts, merge_query, run_query_part
from workers.fanout_plan import should_fan_out
from workers.leases import HeldLease, holding, leases
from workers.notifications import notify
from workers.results import store_result
from workers.retrying import is_transient, with_retries
from workers.stopping import Canceled, ProgressWriter

log = logging.getLogger(__name__)

__all__ = ["merge_query", "on_job_failure", "run_query", "run_query_part"]


def run_query(query_id: str) -> None:
    """Compute (or fan out) one query; idempotent."""
    settings = get_settings()

    def read() -> Query | None:
        with session_scope(settings) as session:
            return repo.get_query(session, query_id)

    query = with_retries(read, settings, what=f"query {query_id}: read")
    if query is None or QueryStatus(query.status).is_final:
        log.info("query %s: nothing to do (%s)", query_id, "unknown" if query is None else query.status)
        return
    with holding(leases(settings), f"query:{query_id}") as lease:
        if lease is None:
            log.info("query %s is already running on another worker", query_id)
            return
        _run(query_id, settings, lease)
    if query.callback_url:  # fixed at submission; without one there is nothing to notify
        notify(query_id, settings)


def _start(query_id: str, settings: Settings) -> tuple[Query, Model | None, Dataset | None] | None:
    """Mark the query `running` (attempts + 1) and read it with its model and dataset; None if final."""
    with session_scope(settings) as session:
        if not repo.start_attempt(session, query_id):
            return None
        query = repo.get_query(session, query_id)
        if query is None:
            return None
        model_row, dataset_row = repo.model_and_dataset(session, query)
        return query, model_row, dataset_row


def _run(query_id: str, settings: Settings, lease: HeldLease) -> None:
    """Each step is retried on a transient database/Redis error (`with_retries`); a step that
    keeps failing that way leaves the query `running` for the reaper, never `failed`."""
    try:
        started = with_retries(lambda: _start(query_id, settings), settings, what=f"query {query_id}: start")
        if started is None:
            return
        query, model_row, dataset_row = started
        if model_row is None or dataset_row is None:
            _fail(query_id, "the query's model or dataset no longer exists", settings)
            return
        # rank stability ranks each resample over every row, so such a query runs as one job
        if not query.stability and should_fan_out(query, int(dataset_row.num_samples), settings,
                                                  task=str(model_row.task)):
            with_retries(lambda: dispatch_parts(query_id, [int(s.num_samples) for s in dataset_row.shards], settings),
                         settings, what=f"query {query_id}: fan out")
            return
        with contextlib.ExitStack() as companion_leases:
            companions = with_retries(lambda: claim_companions(query, settings, companion_leases), settings,
                                      what=f"query {query_id}: claim companions")
            if companions:  # other queued queries share this query's sweep
                run_batch([Member(query, lease), *companions], model_row, dataset_row, settings)
                notify_all(companions, settings)
                return

        def write(fraction: float) -> str | None:
            with session_scope(settings) as s:
                return repo.set_progress(s, query_id, fraction)

        progress = ProgressWriter(write, [lease], timeout_s=settings.job_timeout_s)
        computed = with_retries(
            lambda: compute_scores(query, model_row, dataset_row, settings, row_start=0,
                                   row_stop=int(dataset_row.num_samples), progress=progress),
            settings, what=f"query {query_id}: compute")
        if lease.lost:
            raise Canceled("the job's lease was taken over by another worker")
        stored = with_retries(
            lambda: store_result(query, computed.scores.numpy(), computed.train, settings,
                                 timings=computed.timings, extras=computed.extras,
                                 model_row=model_row, dataset_row=dataset_row, stability=computed.stability),
            settings, what=f"query {query_id}: store")
        log.info("query %s: %s", query_id, "succeeded" if stored else "no longer running; result dropped")
    except Canceled as exc:
        log.info("query %s stopped: %s", query_id, exc)
    except Exception as exc:
        if is_transient(exc):
            log.warning("query %s: the database or Redis stayed unreachable (%s); left running for the reaper "
                        "to re-enqueue", query_id, one_line(exc))
            return
        log.exception("query %s failed", query_id)
        _fail(query_id, one_line(exc), settings)


def _fail(query_id: str, error: str, settings: Settings) -> None:
    def mark() -> None:
        with session_scope(settings) as session:
            repo.mark_failed(session, query_id, error)
    with_retries(mark, settings, what=f"query {query_id}: mark failed")


def on_job_failure(job: Any, connection: Any, exc_type: Any = None, exc_value: Any = None, tb: Any = None) -> None:
    """RQ failure callback: once RQ will not retry, fail the job's query (unless it is alive elsewhere)."""
    if job.retries_left:
        return  # RQ re-enqueues the job; the next attempt resumes the query
    args = list(job.args or ())
    if not args or not isinstance(args[0], str):
        return
    query_id = args[0]
    part = args[1] if len(args) > 1 and isinstance(args[1], int) else None
    settings = get_settings()
    store = leases(settings)
    lease_name = f"query:{query_id}" if part is None else f"part:{query_id}:{part}"
    if store.alive(lease_name) or (exc_value is not None and is_transient(exc_value)):
        return  # alive elsewhere, or a database/Redis outage: the reaper re-enqueues it
    reason = getattr(exc_type, "__name__", None) or "unknown error"
    detail = f": {exc_value}" if exc_value is not None and str(exc_value) else ""
    error = f"worker lost: the job died outside the worker's control ({reason}{detail})"
    with session_scope(settings) as session:
        if part is not None:
            repo.fail_part(session, query_id, part, error)
        failed = repo.mark_failed(session, query_id, error)
    if failed:
        notify(query_id, settings)
