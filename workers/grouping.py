"""Group attribution in the jobs: row scores `[Q, N]` → group scores `[Q, G]`, ranked.

A query's `group_by` says what one score column stands for:
- `row`: a training row (no grouping);
- `shard`: a shard of the dataset; group g is the shard at position g (G = number of shards);
- `group`: a value of the shards' optional `group` column (a user, a source, ...); groups
  are ordered by id, numerically when every id is an integer, else as text (Unicode code
  points), and group g is the g-th id in that order.

Its `group_reduce` combines a group's row scores (`attribution.groups.group_scores`):
`mean` (support per row, comparable across group sizes) or `sum` (total support).

The ranking of a grouped query lists groups: `index` is the group index g, `sample_id` the
group id (the shard position as text for `shard`), `shard` the shard holding the group's
first row. The score file holds `[G]` (or `[Q, G]`), and `<id>.groups.json` beside it the
group ids in column order (`{"group_by": ..., "groups": [...]}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attribution.groups import group_scores, shard_group_ids
from attribution.topk import bottom_k, top_k
from loading import ShardedTrainingSet
from loading.errors import ShardError
from loading.shards import GROUP_COLUMN
from service.atomic_files import write_atomic
from service.db.repositories.queries import RankedRow

GROUP_BY_VALUES = ("row", "shard", "group")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class RowGroups:
    """How the rows of a training set fall into groups.

    `ids` `[n]` int64: the group index of each row of the set; `labels` `[G]`: each group's
    id; `shards` `[G]`: the shard holding each group's first row.
    """

    group_by: str
    ids: Tensor
    labels: list[str]
    shards: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def aggregate(self, scores: np.ndarray, reduce: str) -> np.ndarray:
        """`[Q, n]` row scores → `[Q, G]` float32 group scores (`mean` or `sum`)."""
        rows = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        return group_scores(rows, self.ids, num_groups=len(self), reduce=reduce).numpy()

    def ranked(self, scores: np.ndarray, k: int) -> list[RankedRow]:
        """Top-k and bottom-k groups of each row of `[Q, G]` (ties to the lower group index)."""
        rows: list[RankedRow] = []
        for sample, vector in enumerate(scores):
            values = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
            for kind, picked in (("top", top_k(values, k)), ("bottom", bottom_k(values, k))):
                rows.extend(
                    RankedRow(kind=kind, sample=sample, rank=rank, index=group, sample_id=self.labels[group],
                              shard=self.shards[group], score=score)
                    for rank, (group, score) in enumerate(picked.as_pairs(), start=1)
                )
        return rows


def row_groups(train: ShardedTrainingSet, group_by: str) -> RowGroups:
    """The grouping `group_by` (`shard` or `group`) of the set's rows."""
    if group_by == "shard":
        sizes = [shard.num_samples for shard in train.shards]
        ids = shard_group_ids(sizes)[train.row_start:train.row_stop]
        return RowGroups(group_by, ids, [str(p) for p in range(len(sizes))], list(range(len(sizes))))
    if group_by != "group":
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY_VALUES[1:])} to group rows, not {group_by!r}")
    values = train.column_values(GROUP_COLUMN)
    missing = next((row for row, value in enumerate(values) if value is None), None)
    if missing is not None:
        position = train.shard_of_row([train.row_start + missing])[0]
        raise ShardError("group_by", f"shards[{position}] has no `{GROUP_COLUMN}` column")
    labels = ordered_group_ids(v for v in values if v is not None)
    index = {label: g for g, label in enumerate(labels)}
    ids = torch.tensor([index[v] for v in values if v is not None], dtype=torch.long)
    first = torch.full((len(labels),), len(values), dtype=torch.long).scatter_reduce(
        0, ids, torch.arange(len(values)), reduce="amin")
    return RowGroups(group_by, ids, labels, train.shard_of_row([train.row_start + int(r) for r in first]))


def ordered_group_ids(values: Iterable[str]) -> list[str]:
    """Distinct group ids, numerically ordered when all are integers, else by text."""
    unique = set(values)
    if all(_INTEGER.fullmatch(v) for v in unique):
        return sorted(unique, key=lambda v: (int(v), v))
    return sorted(unique)


def labels_path(scores_path: Path) -> Path:
    """`<id>.groups.json` beside the score file `<id>.npy`."""
    return scores_path.with_name(f"{scores_path.stem}.groups.json")


def write_labels(scores_path: Path, groups: RowGroups) -> None:
    payload = {"group_by": groups.group_by, "groups": groups.labels}
    write_atomic(labels_path(scores_path), json.dumps(payload, separators=(",", ":")).encode())
