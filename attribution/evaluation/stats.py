"""Correlation statistics shared by the evaluation metrics (float64, ties get average ranks)."""

from __future__ import annotations

import torch
from torch import Tensor


def _vector(x: Tensor, name: str) -> Tensor:
    v = torch.as_tensor(x).detach().cpu().to(torch.float64).reshape(-1)
    if bool(torch.isnan(v).any()):
        raise ValueError(f"{name} contains NaN")
    return v


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equal-length vectors; NaN if either is constant."""
    a, b = _vector(x, "x"), _vector(y, "y")
    if a.shape != b.shape or len(a) < 2:
        raise ValueError("pearson needs two vectors of the same length ≥ 2")
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties sharing their average rank (`scipy.stats.rankdata`)."""
    v = _vector(x, "x")
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(1, len(v) + 1, dtype=torch.float64)
    # Average the ranks inside each run of equal values.
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks[order])
    ranks[order] = (sums / counts.to(torch.float64))[inverse]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))
