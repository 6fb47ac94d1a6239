"""Statistics shared by the evaluation metrics: correlations (float64, ties get average ranks)
and the paired bootstrap of a difference between two methods on the same points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor


def _vector(x: Tensor, name: str) -> np.ndarray:
    v = torch.as_tensor(x).detach().cpu().to(torch.float64).reshape(-1).numpy()
    if np.isnan(v).any():
        raise ValueError(f"{name} contains NaN")
    return v


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equal-length vectors (`scipy.stats.pearsonr`); NaN if either is constant."""
    a, b = _vector(x, "x"), _vector(y, "y")
    if a.shape != b.shape or len(a) < 2:
        raise ValueError("pearson needs two vectors of the same length ≥ 2")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.pearsonr(a, b).statistic)


def average_ranks(x: Tensor) -> Tensor:
    """1-based float64 ranks with ties sharing their average rank (`scipy.stats.rankdata`)."""
    return torch.from_numpy(stats.rankdata(_vector(x, "x")).astype(np.float64))


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


@dataclass(frozen=True)
class PairedDifference:
    """stat(a) − stat(b) on all points and its paired-bootstrap percentile interval."""

    difference: float
    low: float
    high: float
    level: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (a wins or loses beyond resampling noise)."""
        return self.low > 0.0 or self.high < 0.0


def paired_bootstrap(
    statistic_a: Callable[[Tensor], float], statistic_b: Callable[[Tensor], float], num_points: int, *,
    resamples: int = 1000, level: float = 0.95, seed: int = 0, usable: Callable[[Tensor], bool] | None = None,
) -> PairedDifference:
    """Paired bootstrap of `statistic_a(index) − statistic_b(index)` over `num_points` points.

    Each statistic maps an `[M]` long index of points (drawn with replacement) to a number;
    each resample draws `num_points` indices — the same for both — and `usable(index)` may
    reject a resample on which a statistic is undefined (e.g. one class only). The interval
    is the (1 ± level)/2 percentiles of the resampled differences.
    """
    if num_points < 1 or resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError("need num_points ≥ 1, resamples ≥ 1 and level in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(resamples):
        index = torch.randint(0, num_points, (num_points,), generator=gen)
        if usable is not None and not usable(index):
            continue
        diffs.append(statistic_a(index) - statistic_b(index))
    if not diffs:
        raise ValueError("no usable resample; too few points")
    spread = torch.tensor(diffs, dtype=torch.float64)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(spread, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    everything = torch.arange(num_points)
    return PairedDifference(statistic_a(everything) - statistic_b(everything), float(low), float(high), level)


def mean_difference(a: Tensor, b: Tensor, *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> PairedDifference:
    """Paired bootstrap of mean(a) − mean(b) for per-point values `a`, `b` `[M]` (NaNs skipped
    in each mean: e.g. per-query top-1 hits or per-query LDS)."""
    va, vb = torch.as_tensor(a, dtype=torch.float64).reshape(-1), torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if va.shape != vb.shape:
        raise ValueError("both per-point vectors must have the same length")
    return paired_bootstrap(lambda i: float(va[i].nanmean()), lambda i: float(vb[i].nanmean()), len(va),
                            resamples=resamples, level=level, seed=seed)
