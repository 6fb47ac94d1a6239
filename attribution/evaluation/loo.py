"""Exact leave-one-out (LOO) retraining for small models: the ground truth of train→test influence.

For each evaluated row i, retrain without it and measure the query losses:

    change[q, i] = L(θ_{−i}, z_q) − L(θ_all, z_q)                       [Q, R]

Positive = removing row i raises the query loss = row i supported the query, the product's
sign convention, so `change` is directly comparable with any method's scores (e.g. with
`mirrored_correlation` or `loo_correlation`). The caller supplies `retrain(mask) -> model`,
where `mask` `[N]` (bool) marks the rows to train on; retraining must be deterministic
(fixed seed, or a convex model fitted to convergence) or the changes are noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.data import Batch
from attribution.evaluation.mirrored import Correlation
from attribution.evaluation.stats import pearson, spearman
from attribution.model import ModelAdapter

Retrain = Callable[[Tensor], ModelAdapter]


@dataclass(frozen=True)
class LooResult:
    rows: Tensor  # [R] evaluated row indices
    changes: Tensor  # [Q, R] float64 query-loss change when each row is removed
    full_losses: Tensor  # [Q] query losses of the model trained on every row


def query_losses(model: ModelAdapter, queries: Batch) -> Tensor:
    """`[Q]` float64 losses of the queries under `model`."""
    with torch.inference_mode():
        return model.loss(queries).detach().cpu().to(torch.float64)


def leave_one_out(
    retrain: Retrain,
    num_rows: int,
    queries: Batch,
    *,
    rows: Sequence[int] | Tensor | None = None,
    progress: Callable[[float], None] | None = None,
) -> LooResult:
    """Retrain once on all rows and once without each row of `rows` (default: every row)."""
    if num_rows < 2:
        raise ValueError("leave-one-out needs at least two training rows")
    selected = torch.arange(num_rows) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if len(selected) and (int(selected.min()) < 0 or int(selected.max()) >= num_rows):
        raise ValueError(f"rows must be in [0, {num_rows})")
    full = query_losses(retrain(torch.ones(num_rows, dtype=torch.bool)), queries)
    changes = torch.empty(len(full), len(selected), dtype=torch.float64)
    for j, row in enumerate(selected.tolist()):
        mask = torch.ones(num_rows, dtype=torch.bool)
        mask[row] = False
        changes[:, j] = query_losses(retrain(mask), queries) - full
        if progress is not None:
            progress((j + 1) / len(selected))
    return LooResult(selected, changes, full)


def loo_correlation(scores: Tensor, result: LooResult, query: int = 0) -> Correlation:
    """Pearson/Spearman between a method's scores `[N]` (or `[Q, N]`) and the LOO changes of one query."""
    row_scores = scores[query] if scores.dim() == 2 else scores
    predicted = row_scores[result.rows]
    actual = result.changes[query]
    return Correlation(pearson(predicted, actual), spearman(predicted, actual))
