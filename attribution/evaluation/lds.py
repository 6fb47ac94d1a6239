"""Linear Datamodeling Score (LDS; Park et al. 2023, TRAK, eq. 4).

Sample M random subsets S_j of the training rows (each row kept with probability `fraction`),
retrain a model on each and measure each query's loss L(θ_{S_j}, z_q). Attribution scores
are additive predictions of that outcome: with the product's sign (higher = the row lowers
the query loss), the predicted loss of a subset is −Σ_{i∈S_j} score(q, i). Then

    LDS(q) = Spearman_j( −Σ_{i∈S_j} score(q, i),  L(θ_{S_j}, z_q) )

and the reported figure is the mean over queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.data import Batch
from attribution.evaluation.loo import Retrain, query_losses
from attribution.evaluation.stats import spearman


@dataclass(frozen=True)
class LdsResult:
    per_query: Tensor  # [Q] Spearman correlation per query
    mean: float


def sample_subsets(num_rows: int, num_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """`[M, N]` bool masks, exactly round(fraction·N) rows per subset, uniformly at random."""
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be in (0, 1)")
    if num_subsets < 2 or num_rows < 2:
        raise ValueError("need at least two subsets of at least two rows")
    keep = max(1, round(fraction * num_rows))
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_subsets, num_rows, dtype=torch.bool)
    for j in range(num_subsets):
        masks[j, torch.randperm(num_rows, generator=generator)[:keep]] = True
    return masks


def retrained_losses(
    retrain: Retrain, subsets: Tensor, queries: Batch, progress: Callable[[float], None] | None = None
) -> Tensor:
    """`[M, Q]` query losses of a model retrained on each subset mask `[M, N]`."""
    out = torch.stack([query_losses(retrain(mask), queries) for mask in subsets])
    if progress is not None:
        progress(1.0)
    return out


def linear_datamodeling_score(scores: Tensor, subsets: Tensor, losses: Tensor) -> LdsResult:
    """LDS of `scores` `[Q, N]` given subset masks `[M, N]` and retrained query losses `[M, Q]`."""
    scores = scores.unsqueeze(0) if scores.dim() == 1 else scores
    if subsets.dim() != 2 or subsets.shape[1] != scores.shape[1]:
        raise ValueError(f"subsets must be [M, N={scores.shape[1]}]")
    if losses.shape != (subsets.shape[0], scores.shape[0]):
        raise ValueError(f"losses must be [M={subsets.shape[0]}, Q={scores.shape[0]}]")
    predicted = -(subsets.to(torch.float64) @ scores.to(torch.float64).T)  # [M, Q]
    per_query = torch.tensor([spearman(predicted[:, q], losses[:, q]) for q in range(scores.shape[0])],
                             dtype=torch.float64)
    return LdsResult(per_query, float(per_query.nanmean()))
