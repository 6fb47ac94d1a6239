"""Proponent retrieval (fact tracing): are the training rows that support a query ranked high?

Each query q has a set R_q of relevant training rows (its proponents, e.g. the sentences
stating the fact the query asks for), given as a boolean mask `relevant` `[Q, N]`. Rows
are ranked in the `topk` order (score descending, ties to the lower index, NaN never ranks).

    MRR = (1/Q) Σ_q 1 / rank_q,        rank_q = rank of q's best-ranked proponent
    precision@k = (1/Q) Σ_q |top-k_q ∩ R_q| / k_q,   k_q = k, or |R_q| when k is None

(Akyürek et al. 2022, "Towards Tracing Factual Knowledge in Language Models Back to the
Training Data", §3: MRR of the first proponent; precision at k = |R_q| is the R-precision.)

`retrieval_difference` compares two rankings of the same queries: the paired bootstrap over
queries of mean(m_a − m_b), m the per-query reciprocal rank or precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.evaluation.leakage import copy_ranks
from attribution.evaluation.stats import PairedDifference, mean_difference
from attribution.topk import top_k


def _checked(scores: Tensor, relevant: Tensor) -> Tensor:
    """`relevant` as a `[Q, N]` bool mask matching `scores`, each query with ≥ 1 proponent."""
    mask = torch.as_tensor(relevant).cpu().bool()
    if scores.dim() != 2 or mask.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(mask.shape)} must both be [Q, N]")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant row")
    return mask


def proponent_ranks(scores: Tensor, relevant: Tensor) -> Tensor:
    """`[Q]` 1-based rank of each query's best-ranked relevant row (N + 1 if all are NaN)."""
    mask = _checked(scores, relevant)
    counts = mask.sum(dim=1)
    # Pad each query's proponent list by repeating its first one: the best rank is unchanged.
    width = int(counts.max())
    positions = torch.stack([
        torch.cat([row.nonzero().flatten(), row.nonzero()[0].repeat(width - int(row.sum()))]) for row in mask
    ])
    return copy_ranks(scores, positions)


def mean_reciprocal_rank(scores: Tensor, relevant: Tensor) -> float:
    """MRR of the first proponent over the Q queries (scores `[Q, N]`, relevant `[Q, N]` bool)."""
    return float((1.0 / proponent_ranks(scores, relevant).double()).mean())


def precision_at_k(scores: Tensor, relevant: Tensor, k: int | None = None) -> float:
    """Mean fraction of each query's top-k rows that are relevant; `k=None`: k_q = |R_q| (R-precision)."""
    return float(query_precisions(scores, relevant, k).mean())


def query_precisions(scores: Tensor, relevant: Tensor, k: int | None = None) -> Tensor:
    """`[Q]` float64 fraction of each query's top-k rows that are relevant (`precision_at_k`'s terms)."""
    mask = _checked(scores, relevant)
    if k is not None and not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}]")
    ks = mask.sum(dim=1) if k is None else torch.full((mask.shape[0],), k)
    best = top_k(scores.detach().cpu(), int(ks.max()))
    hits = []
    for q, k_q in enumerate(ks.tolist()):
        index = best.indices[q, :k_q]
        index = index[index >= 0]  # padding of rows without a score
        hits.append(float(mask[q, index].sum()) / k_q)
    return torch.tensor(hits, dtype=torch.float64)


def retrieval_difference(scores_a: Tensor, scores_b: Tensor, relevant: Tensor, *, metric: str = "mrr",
                         k: int | None = None, resamples: int = 1000, level: float = 0.95,
                         seed: int = 0) -> PairedDifference:
    """Paired bootstrap over queries of metric(`scores_a`) − metric(`scores_b`), both `[Q, N]`,
    `relevant` `[Q, N]` (`stats.mean_difference` of the per-query values).

    metric "mrr": per-query 1/rank_q; "precision": per-query precision@k (k=None: |R_q|).
    """
    if metric == "mrr":
        a, b = (1.0 / proponent_ranks(s, relevant).double() for s in (scores_a, scores_b))
    elif metric == "precision":
        a, b = (query_precisions(s, relevant, k) for s in (scores_a, scores_b))
    else:
        raise ValueError(f"unknown metric {metric!r}; valid: mrr, precision")
    return mean_difference(a, b, resamples=resamples, level=level, seed=seed)
