"""Group attribution: row scores → scores of groups of rows (shards, users, sources).

Forward-INF's score is a loss change per training row, so the influence of a group G on the
query is summarised by Σ_{i∈G} score_i ("sum": total support, grows with group size) or
(1/|G|) Σ_{i∈G} score_i ("mean": support per row, comparable across group sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import torch
from torch import Tensor


class GroupReduce(StrEnum):
    MEAN = "mean"
    SUM = "sum"


def group_scores(
    scores: Tensor, group_ids: Tensor, *, num_groups: int | None = None, reduce: str = GroupReduce.MEAN
) -> Tensor:
    """`scores` `[N]` or `[Q, N]`, `group_ids` `[N]` int in [0, G) → `[G]` or `[Q, G]`.

    Empty groups score NaN under "mean" and 0 under "sum"; NaN row scores propagate.
    """
    how = GroupReduce(reduce)
    if group_ids.dim() != 1 or group_ids.shape[0] != scores.shape[-1]:
        raise ValueError(f"group_ids must be [N={scores.shape[-1]}], got shape {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError("group_ids must be an integer tensor")
    ids = group_ids.to(device=scores.device, dtype=torch.long)
    if len(ids) and int(ids.min()) < 0:
        raise ValueError("group ids must be non-negative")
    count = num_groups if num_groups is not None else (int(ids.max()) + 1 if len(ids) else 0)
    if len(ids) and int(ids.max()) >= count:
        raise ValueError(f"group id {int(ids.max())} is out of range for num_groups={count}")
    rows = scores.unsqueeze(0) if scores.dim() == 1 else scores
    totals = torch.zeros(rows.shape[0], count, dtype=rows.dtype, device=rows.device).index_add_(1, ids, rows)
    if how == GroupReduce.MEAN:
        sizes = torch.bincount(ids, minlength=count).to(rows.dtype)
        totals = totals / sizes  # 0/0 → NaN for empty groups
    return totals[0] if scores.dim() == 1 else totals


def shard_group_ids(shard_sizes: Sequence[int]) -> Tensor:
    """`[N]` group id of each row when the groups are consecutive shards of the given sizes."""
    if any(size < 0 for size in shard_sizes):
        raise ValueError("shard sizes must be non-negative")
    return torch.repeat_interleave(torch.arange(len(shard_sizes)), torch.tensor(list(shard_sizes), dtype=torch.long))
