"""Mislabel detection from self-influence: inspect the highest-scoring rows first.

- AUC: probability that a flipped row outscores a clean one (ties count ½), i.e. the
  Mann–Whitney U statistic / (n_pos · n_neg), computed with average ranks.
- Recall at fraction f: share of flipped rows among the ⌈f·N⌉ highest scores.
- Curve: recall after inspecting each prefix of the ranking (Forward-INF paper, Fig. 5).
- Paired bootstrap of an AUC difference: both rankings are scored on the same resampled
  rows, so the interval says whether one ranking beats another beyond sampling noise.
Ties in the ranking are broken by the lower row index (as in `topk`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.evaluation.stats import PairedDifference, average_ranks, paired_bootstrap


@dataclass(frozen=True)
class MislabelReport:
    auc: float
    recall_at: dict[float, float]  # fraction inspected → recall of flipped rows
    fractions: Tensor  # [N] fraction inspected after each row
    recall: Tensor  # [N] recall after each row


def _inputs(scores: Tensor, flipped: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.as_tensor(scores).detach().cpu().to(torch.float64).reshape(-1)
    f = torch.as_tensor(flipped).cpu().reshape(-1).bool()
    if s.shape != f.shape:
        raise ValueError("scores and flipped flags must have the same length")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    if not bool(f.any()) or bool(f.all()):
        raise ValueError("need both flipped and clean rows")
    return s, f


def roc_auc(scores: Tensor, flipped: Tensor) -> float:
    """ROC AUC of `scores` `[N]` for the binary `flipped` flags `[N]`."""
    s, f = _inputs(scores, flipped)
    ranks = average_ranks(s)
    n_pos, n_neg = int(f.sum()), int((~f).sum())
    u = float(ranks[f].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def detection_curve(scores: Tensor, flipped: Tensor) -> tuple[Tensor, Tensor]:
    """`(fractions [N], recall [N])` when rows are inspected in decreasing score order."""
    s, f = _inputs(scores, flipped)
    order = torch.argsort(s, descending=True, stable=True)
    found = torch.cumsum(f[order].to(torch.float64), 0)
    n = len(s)
    return torch.arange(1, n + 1, dtype=torch.float64) / n, found / float(f.sum())


def recall_at_fraction(scores: Tensor, flipped: Tensor, fraction: float) -> float:
    """Recall of flipped rows among the ⌈fraction·N⌉ highest-scoring rows."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must be in (0, 1]")
    _, recall = detection_curve(scores, flipped)
    inspected = min(len(recall), max(1, math.ceil(fraction * len(recall) - 1e-9)))
    return float(recall[inspected - 1])


def mislabel_report(scores: Tensor, flipped: Tensor, fractions: tuple[float, ...] = (0.1, 0.15, 0.25)) -> MislabelReport:
    """AUC, recall at each inspected fraction, and the full curve."""
    curve_x, curve_y = detection_curve(scores, flipped)
    return MislabelReport(
        auc=roc_auc(scores, flipped),
        recall_at={fr: recall_at_fraction(scores, flipped, fr) for fr in fractions},
        fractions=curve_x,
        recall=curve_y,
    )


AucDifference = PairedDifference  # AUC(a) − AUC(b) with its paired-bootstrap interval


def auc_difference(
    scores_a: Tensor, scores_b: Tensor, flipped: Tensor, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> AucDifference:
    """Paired bootstrap of AUC(`scores_a`) − AUC(`scores_b`), both `[N]`, for `flipped` `[N]`.

    Each resample draws N rows with replacement (the same rows for both rankings) and
    recomputes both Mann–Whitney AUCs; the interval is the (1 ± level)/2 percentiles.
    """
    a, f = _inputs(scores_a, flipped)
    b, _ = _inputs(scores_b, flipped)
    if a.shape != b.shape:
        raise ValueError("both score vectors must have the same length")

    def both_classes(rows: Tensor) -> bool:
        return bool(f[rows].any()) and not bool(f[rows].all())

    return paired_bootstrap(lambda rows: roc_auc(a[rows], f[rows]), lambda rows: roc_auc(b[rows], f[rows]), len(a),
                            resamples=resamples, level=level, seed=seed, usable=both_classes)
