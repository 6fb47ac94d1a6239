"""The full score vector of a finished query, read from its `.npy` file under the scores dir.

Score files hold float32 `[N]` (joint mode, self-influence) or `[Q, N]` (per_sample mode),
columns in global training-row order. Grouped queries (`group_by` shard/group) hold `[G]`
or `[Q, G]` in group order, with the group ids in `<id>.groups.json` beside the file
(`workers.grouping`). Cached answers share the computing query's files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.api.errors import Conflict, NotFound
from service.db.models import Query, QueryStatus
from service.db.repositories.queries import RankedRow
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


def group_labels(path: Path, scores: np.ndarray) -> list[str] | None:
    """The group ids of a grouped query's score columns (`<id>.groups.json`), None for row scores."""
    sidecar = path.with_name(f"{path.stem}.groups.json")
    if not sidecar.is_file():
        return None
    try:
        labels = json.loads(sidecar.read_text())["groups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotFound(f"the group ids of {path.name} cannot be read", code="scores_not_found") from exc
    if not isinstance(labels, list) or len(labels) != scores.shape[-1]:
        raise NotFound(f"the group ids of {path.name} do not match its columns", code="scores_not_found")
    return [str(label) for label in labels]


def scores_json(query_id: str, scores: np.ndarray, groups: list[str] | None = None) -> dict[str, Any]:
    """`{"query_id", "shape", "scores"}` (plus `"groups"`, the column group ids, for grouped
    queries); non-finite entries (an empty shard's mean) become null."""
    values = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(values)
    out: dict[str, Any] = {"query_id": query_id, "shape": list(scores.shape)}
    if groups is not None:
        out["groups"] = groups
    if finite.all():
        out["scores"] = values.tolist()
        return out
    listed = values.astype(object)
    listed[~finite] = None
    out["scores"] = listed.tolist()
    return out


StabilityCells = dict[tuple[int, int], tuple[float, int, int]]  # (sample, index) → (stability, rank_low, rank_high)


def scores_csv(scores: np.ndarray, groups: list[str] | None = None,
               previews: dict[int, str] | None = None, stability: StabilityCells | None = None) -> Iterator[str]:
    """CSV, one line per training row in global index order (per group for grouped queries).

    `[N]`: header `index,score`; `[Q, N]`: header `index,sample_0,...,sample_{Q-1}`; grouped
    queries add a `group` column (the group id) after `index`; queries with rank stability
    (`stability`, the ranked rows' figures by (sample, index)) add `stability,rank_low,rank_high`
    (`[Q, N]`: `stability_q,rank_low_q,rank_high_q` per sample q), empty for unranked rows; text
    datasets (`previews`, the ranked rows' text previews by index) add a last column `preview`,
    empty for unranked rows.
    """
    matrix = np.asarray(scores).reshape(1, -1) if scores.ndim == 1 else np.asarray(scores)
    header = ["score"] if scores.ndim == 1 else [f"sample_{q}" for q in range(matrix.shape[0])]
    samples = range(matrix.shape[0]) if stability else range(0)
    for q in samples:
        suffix = "" if scores.ndim == 1 else f"_{q}"
        header += [f"stability{suffix}", f"rank_low{suffix}", f"rank_high{suffix}"]
    if previews:
        header.append("preview")
    yield ("index," if groups is None else "index,group,") + ",".join(header) + "\n"
    columns = matrix.T
    for start in range(0, columns.shape[0], _CSV_ROWS_PER_CHUNK):
        block = columns[start:start + _CSV_ROWS_PER_CHUNK]
        yield "".join(
            f"{start + i}," + ("" if groups is None else f"{_csv_field(groups[start + i])},")
            + ",".join(f"{float(v):.9g}" for v in row)
            + "".join(_stability_cells(stability, q, start + i) for q in samples)
            + ("" if not previews else "," + _csv_field(previews.get(start + i, ""))) + "\n"
            for i, row in enumerate(block)
        )


def _stability_cells(stability: StabilityCells | None, sample: int, index: int) -> str:
    figures = stability.get((sample, index)) if stability else None
    return ",,," if figures is None else f",{figures[0]:.6g},{figures[1]},{figures[2]}"


def stability_cells(rows: Iterable[RankedRow]) -> StabilityCells:
    """The CSV's stability figures of a query's ranked rows; a row in both the top and the
    bottom list (k ≥ N/2) shows its top-list figures."""
    cells: StabilityCells = {}
    for row in sorted(rows, key=lambda r: r.kind != "top"):
        if row.stability is not None and row.rank_low is not None and row.rank_high is not None:
            cells.setdefault((row.sample, row.index), (row.stability, row.rank_low, row.rank_high))
    return cells


def _csv_field(text: str) -> str:
    """One CSV field, quoted when it holds a comma, quote or line break."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
