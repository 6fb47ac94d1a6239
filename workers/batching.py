"""Many queries, one pass: queued queries on the same model and data share a sweep.

A Forward-INF query costs its unlearning run (K steps on its own samples, cheap) plus one
sweep of the training set (a forward pass per row, the whole cost at scale). When a worker
picks up a joint-mode query whose method gives its params a `batch_key`
(`AttributionMethod.batch_key`; Forward-INF: every param except `normalize`, never `auto` or
Newton-step unlearning), `claim_companions` claims up to `settings.batch_max_queries − 1` other
*queued* joint queries with the same model, dataset, method and key (never self-influence or
per_sample).
Claiming a companion = taking its lease `query:<id>` (its own RQ job then finds the lease
held and does nothing; later deliveries find the row final) and marking it `running`.

`run_batch` then computes every query in the group in one pass
(`attribution.pipeline.attribute_many` → `ForwardInf.score_many`: each training batch is read
once and all B unlearned copies are evaluated on it, the cached `L(θ̂, ·)` is shared, and each
query's scores equal the one-by-one result, tested with a 1e-6 tolerance). Each query is then stored on its own: its score
file and, in its own transaction, its ranked rows and `succeeded` (`store_result`).
A canceled companion keeps being computed but its result is dropped at store time; the
batch stops once every member is canceled or lost its lease, or at `JOB_TIMEOUT_S`. A
transient database/Redis error is retried (`workers.retrying`), never failing the group;
any other error fails every query of the group with the same one-line message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import noload

from attribution.interrupts import interruptible
from attribution.methods.base import FitContext
from attribution.pipeline import attribute_many
from loading import (
    ShardedTrainingSet,
    input_spec,
    load_model,
    load_tokenizer,
    samples_to_batch,
)
from service.artifact_store import artifact_store
from service.db.models import Dataset, Model, Query, QueryStatus
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings
from workers.compute import amp_dtype, artifact_fingerprint, method_and_params
from workers.error_text import one_line
from workers.leases import HeldLease, holding, leases
from workers.notifications import notify
from workers.results import store_result
from workers.retrying import is_transient, with_retries
from workers.stopping import Canceled, CheckedRows, ProgressWriter

log = logging.getLogger(__name__)

SCAN_FACTOR = 4  # queued rows inspected per free slot (incompatible params are skipped)


def sweep_key(query: Query) -> tuple[str, str, str, str] | None:
    """What must match for two queries to share a sweep (model, dataset, method and the method's
    `batch_key` of the params); `None` if the query cannot be batched."""
    if query.mode != "joint" or query.self_influence or query.stability:  # resamples rerun the method alone
        return None
    try:
        cls, params = method_and_params(query)
    except ValueError:
        return None  # its own job reports the problem
    key = cls.batch_key(params)
    return None if key is None else (query.model_id, query.dataset_id, query.method, key)


@dataclass
class Member:
    """One query of a batch and the lease that proves this worker runs it."""

    query: Query
    lease: HeldLease


def claim_companions(query: Query, settings: Settings, stack: contextlib.ExitStack) -> list[Member]:
    """Claim queued queries that can share `query`'s sweep (oldest first, at most cap − 1).

    Their leases are held until `stack` closes; each claimed row is now `running`.
    """
    key = sweep_key(query)
    free = int(settings.batch_max_queries) - 1
    if key is None or free < 1:
        return []
    with session_scope(settings) as session:
        candidates = list(session.scalars(
            select(Query).where(
                Query.model_id == query.model_id, Query.dataset_id == query.dataset_id,
                Query.method == query.method, Query.mode == "joint", Query.self_influence.is_(False),
                Query.status == QueryStatus.QUEUED.value, Query.id != query.id,
            ).order_by(Query.created_at).limit(free * SCAN_FACTOR)
            .options(noload(Query.results), noload(Query.parts))
        ))
    store = leases(settings)
    claimed: list[Member] = []
    for candidate in candidates:
        if len(claimed) == free:
            break
        if sweep_key(candidate) != key:
            continue
        lease = stack.enter_context(holding(store, f"query:{candidate.id}"))
        if lease is None:
            continue  # its own job (or another batch) runs it
        with session_scope(settings) as session:
            started = repo.start_attempt(session, candidate.id)
            fresh = repo.get_query(session, candidate.id) if started else None
        if fresh is not None:
            claimed.append(Member(fresh, lease))
    return claimed


def run_batch(members: list[Member], model_row: Model, dataset_row: Dataset, settings: Settings) -> None:
    """Compute every member's query in one sweep and store each on its own; never raises.

    A transient database/Redis error retries the sweep or the store (`with_retries`); one that
    persists leaves the members `running` for the reaper. Any other error fails every member.
    """
    ids = [m.query.id for m in members]
    log.info("batch of %d %s queries, one sweep: %s", len(ids), members[0].query.method, ", ".join(ids))
    progress = ProgressWriter(lambda f: _write_progress(ids, f, settings), [m.lease for m in members],
                              timeout_s=settings.job_timeout_s)
    try:
        with interruptible(progress.check):
            results = with_retries(lambda: compute_batch([m.query for m in members], model_row, dataset_row,
                                                         settings, progress=progress),
                                   settings, what=f"batch {ids[0]}: compute")
        for member, (scores, train, timings, extras) in zip(members, results, strict=True):
            if member.lease.lost:
                log.info("query %s: lease lost; its batched result is dropped", member.query.id)
                continue
            store = partial(store_result, member.query, scores.numpy(), train, settings, timings=timings,
                            extras={"batched_queries": len(members), **extras, **train.text_extras()},
                            model_row=model_row, dataset_row=dataset_row)
            stored = with_retries(store, settings, what=f"query {member.query.id}: store")
            log.info("query %s: %s", member.query.id, "succeeded" if stored else "no longer running; result dropped")
    except Canceled as exc:
        log.info("batch %s stopped: %s", ids, exc)
    except Exception as exc:
        if is_transient(exc):
            log.warning("batch %s: the database or Redis stayed unreachable (%s); left running for the reaper",
                        ids, one_line(exc))
            return
        log.exception("batch %s failed", ids)
        with session_scope(settings) as session:
            for query_id in ids:
                repo.mark_failed(session, query_id, one_line(exc))


def notify_all(members: list[Member], settings: Settings) -> None:
    for member in members:
        notify(member.query.id, settings)


def _write_progress(ids: list[str], fraction: float, settings: Settings) -> str | None:
    """Record progress on every member; `running` while any member still runs (else the first's status)."""
    statuses = []
    with session_scope(settings) as session:
        for query_id in ids:
            statuses.append(repo.set_progress(session, query_id, fraction))
    running = QueryStatus.RUNNING.value
    return running if running in statuses else statuses[0]


def compute_batch(
    queries: list[Query], model_row: Model, dataset_row: Dataset, settings: Settings, *,
    progress: ProgressWriter,
) -> list[tuple[torch.Tensor, ShardedTrainingSet, dict[str, float], dict[str, Any]]]:
    """`[(scores [1, N] float32 CPU, train set, timings, extras)]`, one per query, from one sweep
    (`attribution.pipeline.attribute_many`).

    All queries must share `sweep_key` (the caller's claim guarantees it).
    """
    if len({sweep_key(q) for q in queries}) != 1 or sweep_key(queries[0]) is None:
        raise ValueError("a batch needs joint queries of one method with the same model, data and sweep params")
    started = time.perf_counter()
    model = load_model(model_row, settings)
    spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
    rows = int(dataset_row.num_samples)
    train = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, row_start=0, row_stop=rows)
    typed = [method_and_params(q) for q in queries]
    with session_scope(settings) as session:
        batches = [samples_to_batch(q.samples or {}, model_row=model_row, model=model, settings=settings,
                                    session=session) for q in queries]
    context = FitContext(fingerprint=artifact_fingerprint(model_row, dataset_row, 0, rows),
                         store=artifact_store(settings), progress=progress, amp_dtype=amp_dtype(settings, model))
    load_s = time.perf_counter() - started
    results = attribute_many(model, typed[0][0], [params for _, params in typed],
                             CheckedRows(train, progress.check), context, queries=batches)  # every batch read can stop the job
    out = []
    for result in results:
        timings = {"load_s": load_s, "base_losses_s": context.timings.get("base_losses_s", 0.0), **result.timings,
                   "total_s": time.perf_counter() - started}
        out.append((result.scores.detach().float().cpu(), train, timings, result.extras))
    return out
