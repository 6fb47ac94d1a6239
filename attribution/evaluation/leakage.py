"""Leakage / duplicate detection: does a query's planted copy in the training set rank first?

Given scores `[Q, N]` and the position(s) of each query's true copy (`[Q]`, or `[Q, C]` when
a query has several copies; the best-ranked copy counts), the rank of a copy follows the
`topk` order: 1 + #rows with a higher score + #rows with an equal score and a lower index.
A NaN copy score never ranks (rank N + 1). The top-k rate is the fraction of queries whose
copy has rank ≤ k (Forward-INF paper, Table 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LeakageResult:
    ranks: Tensor  # [Q] 1-based rank of the best-ranked copy
    top_k_rate: dict[int, float]  # k → fraction of queries with rank ≤ k

    @property
    def top1(self) -> float:
        return self.top_k_rate[1]


def copy_ranks(scores: Tensor, copies: Tensor) -> Tensor:
    """`[Q]` rank of each query's best copy; `copies` `[Q]` or `[Q, C]` (int)."""
    scores = scores.detach().cpu().to(torch.float64)
    if scores.dim() != 2:
        raise ValueError("scores must be [Q, N]")
    copies = torch.as_tensor(copies, dtype=torch.long).cpu()
    copies = copies.unsqueeze(1) if copies.dim() == 1 else copies
    if copies.shape[0] != scores.shape[0]:
        raise ValueError(f"{copies.shape[0]} copy lists for {scores.shape[0]} queries")
    if int(copies.min()) < 0 or int(copies.max()) >= scores.shape[1]:
        raise ValueError(f"copy positions must be in [0, {scores.shape[1]})")
    n = scores.shape[1]
    clean = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    index = torch.arange(n)
    ranks = torch.empty(scores.shape[0], dtype=torch.long)
    for q in range(scores.shape[0]):
        best = n + 1
        for c in copies[q].tolist():
            if torch.isnan(scores[q, c]):
                continue
            value = clean[q, c]
            above = (clean[q] > value) | ((clean[q] == value) & (index < c) & ~torch.isnan(scores[q]))
            best = min(best, 1 + int(above.sum()))
        ranks[q] = best
    return ranks


def leakage_detection(scores: Tensor, copies: Tensor, ks: Sequence[int] = (1, 5, 10)) -> LeakageResult:
    """Top-k detection rates of planted copies for each k in `ks` (1 is always included)."""
    ranks = copy_ranks(scores, copies)
    wanted = sorted({1, *ks})
    if wanted[0] < 1:
        raise ValueError("k must be at least 1")
    return LeakageResult(ranks, {k: float((ranks <= k).double().mean()) for k in wanted})
