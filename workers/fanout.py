"""Fan-out / fan-in: one large query scored by many jobs, one per range of training rows.

A query whose dataset has more than `settings.fanout_rows` rows is split into parts
(`QueryPart` rows) aligned to shard boundaries where possible: whole shards are grouped up
to `fanout_rows` rows, larger shards are cut into equal pieces. Each part is the job
`run_query_part(query_id, part)` (RQ id `<query id>-p<part>`); it scores its rows, writes
`<id>.part<k>.npy` `[Q, n_k]` and marks itself succeeded. The part that finishes last —
decided in one transaction holding the query row lock — runs `merge_query`, which
concatenates the partial matrices in row order and stores the result exactly as a single
job would (same ranking code on the same `[Q, N]` matrix).

Only methods whose score for row i depends on row i alone (given the query) are split:
Forward-INF with fixed settings (the unlearning run uses only the query samples),
TracIn and gradient similarity, without relative normalisation (whose floor uses the
median self-influence over all rows). Influence functions, TRAK and Integrated Influence
fit curvature/kernels over the whole training set and run as one job.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attribution.methods.base import MethodName, Normalize
from service import queue
from service.db.models import Query
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings, get_settings
from workers.cache import write_atomic
from workers.leases import holding, leases
from workers.loading import ShardedTrainingSet, input_spec, load_model, load_tokenizer
from workers.scoring import (
    Canceled,
    ProgressWriter,
    compute_scores,
    notify,
    one_line,
    save_npy,
    store_result,
)

log = logging.getLogger(__name__)

PART_JOB = "workers.jobs.run_query_part"
_ROW_SEPARABLE = {MethodName.FORWARD_INF, MethodName.TRACIN, MethodName.GRADIENT_SIMILARITY}


def plan_ranges(shard_sizes: Sequence[int], target: int) -> list[tuple[int, int]]:
    """Global row ranges `[lo, hi)` of at most `target` rows, cut at shard boundaries where possible."""
    if target < 1:
        raise ValueError("target must be positive")
    ranges: list[tuple[int, int]] = []
    lo = offset = 0
    for size in shard_sizes:
        if size > target:
            if offset > lo:
                ranges.append((lo, offset))
            pieces = math.ceil(size / target)
            bounds = [offset + (size * j) // pieces for j in range(pieces + 1)]
            ranges.extend(itertools.pairwise(bounds))
            lo = offset + size
        elif offset + size - lo > target:
            ranges.append((lo, offset))
            lo = offset
        offset += size
    if offset > lo:
        ranges.append((lo, offset))
    return ranges


def should_fan_out(query: Query, num_samples: int, settings: Settings) -> bool:
    if num_samples <= settings.fanout_rows:
        return False
    params = query.params or {}
    try:
        method = MethodName(query.method)
    except ValueError:
        return False
    if method not in _ROW_SEPARABLE or params.get("normalize", Normalize.NONE.value) == Normalize.RELATIVE.value:
        return False
    return not (method == MethodName.FORWARD_INF and params.get("auto"))


def part_job_id(query_id: str, part: int) -> str:
    return f"{query_id}-p{part}"


def dispatch_parts(query_id: str, shard_sizes: Sequence[int], settings: Settings) -> None:
    """Create the query's parts (first time) and enqueue every part that has not succeeded and is not running."""
    store = leases(settings)
    with session_scope(settings) as session:
        parts = repo.ensure_parts(session, query_id, plan_ranges(shard_sizes, settings.fanout_rows))
        todo = [p.part for p in parts if p.status != "succeeded" and not store.alive(f"part:{query_id}:{p.part}")]
        for part in todo:
            repo.requeue_part(session, query_id, part)
    log.info("query %s: %d parts, enqueueing %s", query_id, len(parts), todo)
    if not todo:
        if all(p.status == "succeeded" for p in parts):
            merge_query(query_id)
        return
    for part in todo:
        queue.enqueue(PART_JOB, query_id, part, job_id=part_job_id(query_id, part), settings=settings)


def _part_file(query_id: str, part: int) -> str:
    return f"{query_id}.part{part}.npy"


def run_query_part(query_id: str, part: int) -> None:
    """Score one part's rows; the last part to finish merges. Idempotent like `run_query`."""
    settings = get_settings()
    with holding(leases(settings), f"part:{query_id}:{part}") as lease:
        if lease is None:
            log.info("query %s part %d is already running elsewhere", query_id, part)
            return
        with session_scope(settings) as session:
            if not repo.start_part(session, query_id, part):
                return
            query = repo.get_query(session, query_id)
            part_row = repo.get_part(session, query_id, part)
            model_row, dataset_row = repo.model_and_dataset(session, query) if query else (None, None)
        if query is None or part_row is None or model_row is None or dataset_row is None:
            return
        last = False
        try:
            def write(fraction: float) -> str | None:
                with session_scope(settings) as s:
                    return repo.set_part_progress(s, query_id, part, fraction)

            computed = compute_scores(query, model_row, dataset_row, settings, row_start=part_row.row_start,
                                      row_stop=part_row.row_stop, progress=ProgressWriter(write, lease))
            settings.scores_dir.mkdir(parents=True, exist_ok=True)
            save_npy(settings.scores_dir / _part_file(query_id, part), computed.scores.numpy())
            sidecar = {"timings": computed.timings, "extras": computed.extras}
            write_atomic(settings.scores_dir / f"{query_id}.part{part}.json", json.dumps(sidecar, default=str).encode())
            with session_scope(settings) as session:
                last = repo.finish_part(session, query_id, part, _part_file(query_id, part))
        except Canceled as exc:
            log.info("query %s part %d stopped: %s", query_id, part, exc)
            _remove_part_files(query_id, range(query.num_parts), settings)
            return
        except Exception as exc:
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
    with session_scope(settings) as session:
        query = repo.get_query(session, query_id)
        parts = repo.parts_of(session, query_id)
        model_row, dataset_row = repo.model_and_dataset(session, query) if query else (None, None)
    if query is None or model_row is None or dataset_row is None or not parts:
        return
    try:
        matrices = [np.load(settings.scores_dir / (p.scores_path or ""), allow_pickle=False) for p in parts]
        merged = np.concatenate(matrices, axis=1)
        timings: dict[str, float] = {}
        extras: dict[str, Any] = {}
        for p in parts:
            sidecar = json.loads((settings.scores_dir / f"{query_id}.part{p.part}.json").read_text())
            for name, seconds in sidecar["timings"].items():
                timings[name] = timings.get(name, 0.0) + float(seconds)
            extras = extras or sidecar["extras"]
        extras["num_parts"] = len(parts)
        model = load_model(model_row, settings)
        spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
        train = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, verify=False, prefetch=False)
        store_result(query, merged, train, settings, timings=timings, extras=extras)
    except Exception as exc:
        log.exception("query %s: merging parts failed", query_id)
        with session_scope(settings) as session:
            repo.mark_failed(session, query_id, f"merge: {one_line(exc)}")
    finally:
        _remove_part_files(query_id, [p.part for p in parts], settings)
    notify(query_id, settings)


def _remove_part_files(query_id: str, parts: Sequence[int], settings: Settings) -> None:
    for part in parts:
        (settings.scores_dir / _part_file(query_id, part)).unlink(missing_ok=True)
        (settings.scores_dir / f"{query_id}.part{part}.json").unlink(missing_ok=True)
