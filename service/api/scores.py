"""The full score vector of a finished query, read from its `.npy` file under the scores dir.

Score files hold float32 `[N]` (joint mode, self-influence) or `[Q, N]` (per_sample mode),
columns in global training-row order. Cached answers share the computing query's file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.api.errors import Conflict, NotFound
from service.db.models import Query, QueryStatus
from service.settings import Settings

_CSV_ROWS_PER_CHUNK = 4096


def score_file(settings: Settings, query: Query) -> Path:
    """Path of a succeeded query's score file; 409 before it finished, 404 if it is gone."""
    if query.status != QueryStatus.SUCCEEDED.value:
        raise Conflict(f"query {query.id} is {query.status}; scores exist only once it succeeded",
                       code="not_finished")
    root = settings.scores_dir.resolve()
    if not query.scores_path:
        raise NotFound(f"query {query.id} has no stored score file", code="scores_not_found")
    path = (root / query.scores_path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFound(f"the score file of query {query.id} is no longer available", code="scores_not_found")
    return path


def load_scores(path: Path) -> np.ndarray:
    """`[N]` or `[Q, N]` float32 scores (memory-mapped, no pickles)."""
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise NotFound(f"the score file {path.name} cannot be read", code="scores_not_found") from exc
    if scores.ndim not in (1, 2):
        raise NotFound(f"the score file {path.name} is not a vector or matrix", code="scores_not_found")
    return scores


def scores_json(query_id: str, scores: np.ndarray) -> dict[str, Any]:
    """`{"query_id", "shape", "scores"}`; non-finite entries (never expected) become null."""
    values = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(values)
    if finite.all():
        return {"query_id": query_id, "shape": list(scores.shape), "scores": values.tolist()}
    listed = values.astype(object)
    listed[~finite] = None
    return {"query_id": query_id, "shape": list(scores.shape), "scores": listed.tolist()}


def scores_csv(scores: np.ndarray) -> Iterator[str]:
    """CSV, one line per training row in global index order.

    `[N]`: header `index,score`; `[Q, N]`: header `index,sample_0,...,sample_{Q-1}`.
    """
    matrix = np.asarray(scores).reshape(1, -1) if scores.ndim == 1 else np.asarray(scores)
    header = ["score"] if scores.ndim == 1 else [f"sample_{q}" for q in range(matrix.shape[0])]
    yield "index," + ",".join(header) + "\n"
    columns = matrix.T
    for start in range(0, columns.shape[0], _CSV_ROWS_PER_CHUNK):
        block = columns[start:start + _CSV_ROWS_PER_CHUNK]
        yield "".join(
            f"{start + i}," + ",".join(f"{float(v):.9g}" for v in row) + "\n" for i, row in enumerate(block)
        )
