"""What one job computes: load model, rows and samples, run the method, rank, store.

`compute_scores` runs `attribution.pipeline.attribute` over rows `[row_start, row_stop)` of
a registered dataset and returns the score matrix `[Q, n]` (Q = 1 in joint and
self-influence modes); `store_result` writes the full matrix to `<scores dir>/<id>.npy`
(float32, `[N]` or `[Q, N]`, atomically) and the top/bottom-k rows plus metadata in one
transaction. Fan-out parts call `compute_scores` on their row range and `store_result`
runs once on the merged matrix, so both paths rank identically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution.feature_files import FeatureFiles
from attribution.interrupts import interruptible
from attribution.methods.base import AttributionMethod, FitContext, MethodParams
from attribution.methods.registry import method_class
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.topk import bottom_k, top_k
from loading import (
    ShardedTrainingSet,
    input_spec,
    load_model,
    load_second_moment,
    load_tokenizer,
    samples_to_batch,
)
from loading.errors import ModelLoadError
from service.artifact_store import artifact_store
from service.atomic_files import atomic_file
from service.db.models import Dataset, Model, Query, QueryStatus
from service.db.repositories import jobs as repo
from service.db.repositories.queries import PREVIEW_CHARS, RankedRow
from service.db.session import session_scope
from service.settings import Settings
from workers.grouping import labels_path, row_groups, write_labels
from workers.provenance import provenance_record
from workers.stopping import CheckedRows, ProgressWriter

log = logging.getLogger(__name__)


@dataclass
class Computed:
    scores: Tensor  # [Q, n] float32 on CPU
    train: ShardedTrainingSet
    timings: dict[str, float]
    extras: dict[str, Any]


def method_and_params(query: Query) -> tuple[type[AttributionMethod], MethodParams]:
    """The query's method class and its typed params, rebuilt from the stored (resolved) dict;
    raises `ValueError` (`UnknownMethodError`, `ParamsError`) naming the problem."""
    cls = method_class(query.method)
    return cls, cls.params_type.from_dict(query.params or {})


def artifact_fingerprint(model_row: Model, dataset_row: Dataset, row_start: int, row_stop: int) -> str:
    """What the cached artifacts of a method run depend on besides its params: model and
    dataset contents, task and the row range scored. The single-query, fan-out and batched
    paths all use it, so they share the cached `L(θ̂, ·)` and fits."""
    return f"{model_row.sha256}:{dataset_row.sha256}:{model_row.task}:{row_start}-{row_stop}"


def amp_dtype(settings: Settings, model: ModelAdapter) -> torch.dtype | None:
    if model.device.type != "cuda" or settings.mixed_precision == "none":
        return None
    return torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float16


def compute_scores(
    query: Query, model_row: Model, dataset_row: Dataset, settings: Settings, *,
    row_start: int, row_stop: int, progress: ProgressWriter,
) -> Computed:
    """Scores `[Q, row_stop - row_start]` of the query's method on that row range. The method
    reads the rows through `CheckedRows` and runs `interruptible`, so `progress.check()` can
    stop it at any training batch or solver/unlearning iteration."""
    started = time.perf_counter()
    model = load_model(model_row, settings)
    spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
    train = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, row_start=row_start, row_stop=row_stop)
    cls, params = method_and_params(query)
    inputs = params.context_inputs()
    with session_scope(settings) as session:
        queries = None if query.self_influence else samples_to_batch(
            query.samples or {}, model_row=model_row, model=model, settings=settings, session=session)
        checkpoints = _checkpoints(session, query, list(inputs.checkpoint_model_ids), settings)
    context = FitContext(
        fingerprint=artifact_fingerprint(model_row, dataset_row, row_start, row_stop),
        store=artifact_store(settings), progress=progress, amp_dtype=amp_dtype(settings, model),
        checkpoints=checkpoints, checkpoint_lrs=list(inputs.checkpoint_lrs),
        feature_files=FeatureFiles(settings.features_dir),
        second_moment=load_second_moment(inputs.optimizer_state, settings.data_root) if inputs.optimizer_state else None,
    )
    context.timings["load_s"] = time.perf_counter() - started
    with interruptible(progress.check):
        scores = attribute(model, cls, params, CheckedRows(train, progress.check), context,
                           queries=queries, per_sample=query.mode == "per_sample",
                           self_influence=bool(query.self_influence))
    context.extras.update(train.text_extras())
    context.timings["total_s"] = time.perf_counter() - started
    return Computed(scores.detach().float().cpu(), train, dict(context.timings), dict(context.extras))


def _checkpoints(session: Any, query: Query, ids: list[str], settings: Settings) -> list[ModelAdapter]:
    """Registered checkpoint models θ_c of the query's tenant, in the given order."""
    if not ids:
        return []
    found = repo.tenant_models(session, query.tenant, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ModelLoadError("params.checkpoint_model_ids", f"unknown model {missing[0]}")
    return [load_model(found[i], settings) for i in ids]


# ----------------------------------------------------------------------------- results
def ranked_rows(scores: np.ndarray, train: ShardedTrainingSet, k: int) -> list[RankedRow]:
    """Top-k (highest first) and bottom-k (lowest first) rows of each score row of `[Q, N]`.

    Ties go to the lower row index and NaN scores never rank (`attribution.topk`, which
    streams each row: no `[N]` index or sort buffers). Sample ids and shards of all picked
    rows are looked up in one pass over the shards they fall in.
    """
    if k < 1:
        return []
    picks: list[tuple[str, int, list[tuple[int, float]]]] = []
    for sample, vector in enumerate(scores):
        values = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        picks.append(("top", sample, top_k(values, k, offset=train.row_start).as_pairs()))
        picks.append(("bottom", sample, bottom_k(values, k, offset=train.row_start).as_pairs()))
    indices = [index for _, _, pairs in picks for index, _ in pairs]
    ids, shards = iter(train.sample_ids(indices)), iter(train.shard_of_row(indices))
    previews = iter(text if text is None else text[:PREVIEW_CHARS] for text in train.texts_at(indices))
    return [
        RankedRow(kind=kind, sample=sample, rank=rank, index=index, sample_id=next(ids), shard=next(shards),
                  score=score, preview=next(previews))
        for kind, sample, pairs in picks
        for rank, (index, score) in enumerate(pairs, start=1)
    ]


def save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as a `.npy` file, written atomically and streamed (no serialised copy in memory)."""
    with atomic_file(path) as out:
        np.save(out, array, allow_pickle=False)


def store_result(query: Query, scores: np.ndarray, train: ShardedTrainingSet, settings: Settings, *,
                 timings: dict[str, float], extras: dict[str, Any], model_row: Model, dataset_row: Dataset) -> bool:
    """Write the score file and, in one transaction, the ranked rows, the provenance record
    (`workers.provenance`) and `succeeded`.

    `scores` is `[Q, N]`; the file holds `[N]` unless the query is per_sample. A grouped query
    (`group_by` shard/group, see `workers.grouping`) stores and ranks the `[Q, G]` group
    scores instead. Returns False (and removes the files) if the query stopped being
    `running` meanwhile (canceled).
    """
    matrix = np.asarray(scores, dtype=np.float32)
    num_scored = int(matrix.shape[1])
    groups = row_groups(train, query.group_by) if query.group_by != "row" else None
    if groups is not None:
        matrix = groups.aggregate(matrix, query.group_reduce)
        extras = {**extras, "num_groups": len(groups)}
    stored = matrix if query.mode == "per_sample" and not query.self_influence else matrix.reshape(-1)
    settings.scores_dir.mkdir(parents=True, exist_ok=True)
    name = f"{query.id}.npy"
    path = settings.scores_dir / name
    save_npy(path, stored)
    k = min(int(query.top_k), matrix.shape[1])
    if groups is not None:
        write_labels(path, groups)
    rows = groups.ranked(matrix, k) if groups is not None else ranked_rows(matrix, train, k)
    outcome = repo.QueryOutcome(rows=rows, num_scored=num_scored, scores_path=name,
                                scores_shape=list(stored.shape), timings=timings, extras=_jsonable(extras),
                                provenance=provenance_record(query, model_row, dataset_row, settings, timings))
    with session_scope(settings) as session:
        done = repo.complete(session, query.id, outcome)
    if not done:
        path.unlink(missing_ok=True)
        labels_path(path).unlink(missing_ok=True)
    return done


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def one_line(exc: BaseException) -> str:
    """`ExceptionClass: first line of the message` (no traceback) for a query's `error`."""
    lines = str(exc).strip().splitlines()
    message = lines[0].strip() if lines else ""
    return f"{exc.__class__.__name__}: {message}"[:1000] if message else exc.__class__.__name__


def notify(query_id: str, settings: Settings) -> None:
    """POST `{"id", "status"}` to the query's callback URL, best effort, 5 s timeout."""
    with session_scope(settings) as session:
        query = repo.get_query(session, query_id)
        if query is None or not query.callback_url or not QueryStatus(query.status).is_final:
            return
        url, status = query.callback_url, query.status
    try:
        import httpx

        httpx.post(url, json={"id": query_id, "status": status}, timeout=5.0)
    except Exception as exc:
        log.warning("callback for query %s to %s failed: %s", query_id, url, one_line(exc))
