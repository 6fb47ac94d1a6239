"""A computed query's results: the score file and the ranked rows, stored once.

`store_result` writes the full matrix to `<scores dir>/<id>.npy` (float32, `[N]` or `[Q, N]`,
atomically) and the top/bottom-k rows plus metadata in one transaction. Fan-out parts
compute their row ranges (`workers.compute`) and `store_result` runs once on the merged
matrix, so both paths rank identically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution.methods.auto import auto_record
from attribution.stability import StabilityReport
from attribution.topk import bottom_k, top_k
from loading import ShardedTrainingSet
from service.atomic_files import atomic_file
from service.db.models import Dataset, Model, Query
from service.db.repositories import jobs as repo
from service.db.repositories.queries import PREVIEW_CHARS, RankedRow
from service.db.session import session_scope
from service.settings import Settings
from workers.grouping import labels_path, row_groups, write_labels
from workers.provenance import provenance_record

log = logging.getLogger(__name__)


def ranked_rows(scores: np.ndarray, train: ShardedTrainingSet, k: int,
                stability: StabilityReport | None = None) -> list[RankedRow]:
    """Top-k (highest first) and bottom-k (lowest first) rows of each score row of `[Q, N]`,
    with their rank stability figures when `stability` (computed on the same scores) is given.

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
    rows = [
        RankedRow(kind=kind, sample=sample, rank=rank, index=index, sample_id=next(ids), shard=next(shards),
                  score=score, preview=next(previews))
        for kind, sample, pairs in picks
        for rank, (index, score) in enumerate(pairs, start=1)
    ]
    return rows if stability is None else [_with_stability(row, stability) for row in rows]


def _with_stability(row: RankedRow, stability: StabilityReport) -> RankedRow:
    figures = stability.get(row.kind, row.sample, row.index)
    if figures is None:
        raise ValueError(f"no stability figures for the {row.kind} row {row.index} of sample {row.sample}")
    return row.model_copy(update={"stability": figures.stability, "rank_low": figures.rank_low,
                                  "rank_high": figures.rank_high})


def save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as a `.npy` file, written atomically and streamed (no serialised copy in memory)."""
    with atomic_file(path) as out:
        np.save(out, array, allow_pickle=False)


def store_result(query: Query, scores: np.ndarray, train: ShardedTrainingSet, settings: Settings, *,
                 timings: dict[str, float], extras: dict[str, Any], model_row: Model, dataset_row: Dataset,
                 stability: StabilityReport | None = None) -> bool:
    """Write the score file and, in one transaction, the ranked rows, the provenance record
    (`workers.provenance`) and `succeeded`.

    `scores` is `[Q, N]`; the file holds `[N]` unless the query is per_sample. A grouped query
    (`group_by` shard/group, see `workers.grouping`) stores and ranks the `[Q, G]` group
    scores instead. A `method: "auto"` query's choice, stored in its extras at submission,
    is kept in the result's extras. Returns False (and removes the files) if the query stopped being
    `running` meanwhile (canceled).
    """
    record = auto_record(query.extras)  # `method: "auto"`: the choice stored at submission
    if record is not None:
        extras = {**extras, "auto": record}
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
    rows = groups.ranked(matrix, k) if groups is not None else ranked_rows(matrix, train, k, stability)
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


