"""Fan-out / fan-in jobs: one large query scored by many jobs, one per range of training rows.

`dispatch_parts` creates the query's parts (`QueryPart` rows, ranges from
`workers.fanout_plan`) and enqueues `run_query_part(query_id, part)` for each (RQ id
`<query id>-p<part>`); a part scores its rows, writes its part file (`workers.part_files`:
scores `[Q, n_k]` plus its timings, one file and one fsync) and marks itself succeeded. The
part that finishes last — decided in one transaction holding the query row lock — runs
`merge_query`, which checks each part's width, concatenates the partial matrices in row order
and stores the result exactly as a single job would (same ranking code on the same `[Q, N]`
matrix).

Per-part cost is kept to what the part needs: the query's model and dataset rows, file
hashes and built models are memoised per worker process (`workers.registered_rows`,
`loading`), one part file is written (one fsync), bookkeeping commits that may be lost
harmlessly (a part marked `running`, progress) do not wait for the database's WAL flush
(`service.db.session.relaxed_commit`), and only the final `finish_part` commit does. Each
part's phases (`part_claim_s`, the method's `load_s`/`base_losses_s`/`unlearn_s`/`sweep_s`,
...) are summed into the query's `timings`; the worker log has one line per part with its
wall and CPU time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from loading import ShardedTrainingSet, input_spec, load_model, load_tokenizer
from service import queue
from service.db.repositories import jobs as repo
from service.db.session import relaxed_commit, session_scope
from service.settings import Settings, get_settings
from workers import part_files
from workers.compute import compute_scores
from workers.error_text import one_line
from workers.fanout_plan import part_job_id, plan_ranges
from workers.leases import holding, leases
from workers.notifications import notify
from workers.registered_rows import registered_rows
from workers.results import store_result
from workers.retrying import is_transient, with_retries
from workers.stopping import Canceled, ProgressWriter

log = logging.getLogger(__name__)

PART_JOB = "workers.jobs.run_query_part"


def dispatch_parts(query_id: str, shard_sizes: Sequence[int], settings: Settings) -> None:
    """Create the query's parts (first time) and enqueue every part that has not succeeded and is not running."""
    store = leases(settings)
    with session_scope(settings) as session:
        parts = repo.ensure_parts(session, query_id, plan_ranges(shard_sizes, settings.fanout_rows))
        todo = [p for p in parts if p.status != "succeeded" and not store.alive(f"part:{query_id}:{p.part}")]
        for stale in todo:
            if stale.status != "queued":  # a fresh part is queued already: no UPDATE needed
                repo.requeue_part(session, query_id, stale.part)
    log.info("query %s: %d parts, enqueueing %s", query_id, len(parts), [p.part for p in todo])
    if not todo:
        if all(p.status == "succeeded" for p in parts):
            merge_query(query_id)
        return
    for stale in todo:
        queue.enqueue(PART_JOB, query_id, stale.part, job_id=part_job_id(query_id, stale.part), settings=settings)


def run_query_part(query_id: str, part: int) -> None:
    """Score one part's rows; the last part to finish merges. Idempotent like `run_query`."""
    settings = get_settings()
    started, cpu_started = time.perf_counter(), time.process_time()
    with holding(leases(settings), f"part:{query_id}:{part}") as lease:
        if lease is None:
            log.info("query %s part %d is already running elsewhere", query_id, part)
            return
        with session_scope(settings) as session:
            relaxed_commit(session)
            if not repo.start_part(session, query_id, part):
                return
            query = repo.get_query(session, query_id)
            part_row = repo.get_part(session, query_id, part)
        model_row, dataset_row = registered_rows(query) if query else (None, None)
        if query is None or part_row is None or model_row is None or dataset_row is None:
            return
        phases = {"part_claim_s": time.perf_counter() - started}
        last = False
        try:
            def write(fraction: float) -> str | None:
                with session_scope(settings) as s:
                    relaxed_commit(s)
                    return repo.set_part_progress(s, query_id, part, fraction)

            progress = ProgressWriter(write, [lease], timeout_s=settings.job_timeout_s)
            computed = with_retries(
                lambda: compute_scores(query, model_row, dataset_row, settings, row_start=part_row.row_start,
                                       row_stop=part_row.row_stop, progress=progress),
                settings, what=f"query {query_id} part {part}: compute")
            began = time.perf_counter()
            settings.scores_dir.mkdir(parents=True, exist_ok=True)
            meta = {"timings": {**computed.timings, **phases}, "extras": computed.extras}
            part_files.save_part(settings.scores_dir / part_files.part_file_name(query_id, part), computed.scores.numpy(), meta)
            phases["part_save_s"] = time.perf_counter() - began
            def finish() -> bool:
                with session_scope(settings) as session:
                    return repo.finish_part(session, query_id, part, part_files.part_file_name(query_id, part))
            last = with_retries(finish, settings, what=f"query {query_id} part {part}: finish")
            phases["part_finish_s"] = time.perf_counter() - began - phases["part_save_s"]
            log.info("query %s part %d done in %.3f s (process cpu %.3f s): %s", query_id, part,
                     time.perf_counter() - started, time.process_time() - cpu_started,
                     _phases_text({**computed.timings, **phases}))
        except Canceled as exc:
            log.info("query %s part %d stopped: %s", query_id, part, exc)
            part_files.remove_part_files(query_id, range(query.num_parts), settings)
            return
        except Exception as exc:
            if is_transient(exc):  # the part stays `running` without a lease: the reaper re-enqueues it
                log.warning("query %s part %d: database or Redis unreachable (%s)", query_id, part, one_line(exc))
                return
            log.exception("query %s part %d failed", query_id, part)
            with session_scope(settings) as session:
                repo.fail_part(session, query_id, part, one_line(exc))
                repo.mark_failed(session, query_id, f"part {part}: {one_line(exc)}")
            notify(query_id, settings)
            return
        if last:
            merge_query(query_id)


def merge_query(query_id: str) -> None:
    """Concatenate the parts' score matrices in row order and store the result like a single job."""
    settings = get_settings()
    started, cpu_started = time.perf_counter(), time.process_time()
    with session_scope(settings) as session:
        query = repo.get_query(session, query_id)
        parts = repo.parts_of(session, query_id)
    model_row, dataset_row = registered_rows(query) if query else (None, None)
    if query is None or model_row is None or dataset_row is None or not parts:
        return
    try:
        matrices = []
        timings: dict[str, float] = {}
        extras: dict[str, Any] = {}
        truncated = 0
        for p in parts:
            scores, meta = part_files.load_part(settings.scores_dir / (p.scores_path or ""), p.row_stop - p.row_start)
            matrices.append(scores)
            for name, seconds in meta["timings"].items():
                timings[name] = timings.get(name, 0.0) + float(seconds)
            truncated += int(meta["extras"].get("truncated_rows", 0))
            extras = extras or dict(meta["extras"])
        if "truncated_rows" in extras:
            extras["truncated_rows"] = truncated  # a count over all parts, not the first part's
        merged = np.concatenate(matrices, axis=1)
        extras["num_parts"] = len(parts)
        model = load_model(model_row, settings)
        spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
        train = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, verify=False, prefetch=False)
        timings["merge_read_s"] = time.perf_counter() - started
        store_result(query, merged, train, settings, timings=timings, extras=extras, model_row=model_row,
                     dataset_row=dataset_row)
        log.info("query %s: merged %d parts in %.3f s (process cpu %.3f s)", query_id, len(parts),
                 time.perf_counter() - started, time.process_time() - cpu_started)
    except Exception as exc:
        log.exception("query %s: merging parts failed", query_id)
        with session_scope(settings) as session:
            repo.mark_failed(session, query_id, f"merge: {one_line(exc)}")
    finally:
        part_files.remove_part_files(query_id, [p.part for p in parts], settings)
    if query.callback_url:
        notify(query_id, settings)


def _phases_text(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f}" for name, seconds in timings.items())


