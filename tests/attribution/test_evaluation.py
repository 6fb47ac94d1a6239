"""Evaluation metrics against hand-computed values, scipy and scikit-learn."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from attribution.data import Batch
from attribution.evaluation import (
    auc_difference,
    average_ranks,
    leakage_detection,
    leave_one_out,
    linear_datamodeling_score,
    loo_correlation,
    mean_reciprocal_rank,
    mirrored_correlation,
    mislabel_report,
    pearson,
    precision_at_k,
    proponent_ranks,
    recall_at_fraction,
    retrained_losses,
    retrieval_difference,
    roc_auc,
    sample_subsets,
    spearman,
)
from attribution.model import ModelAdapter
from attribution.tasks import RegressionTask

NAN = float("nan")


def test_correlations_match_scipy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    y_tied = np.round(y)
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y_tied)) == pytest.approx(stats.spearmanr(x, y_tied)[0], abs=1e-12)
    np.testing.assert_allclose(average_ranks(torch.tensor(y_tied)).numpy(), stats.rankdata(y_tied))
    result = mirrored_correlation(torch.tensor(x), torch.tensor(y))
    assert result.spearman == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert np.isnan(pearson(torch.ones(4), torch.arange(4.0)))


def test_mislabel_metrics() -> None:
    rng = np.random.default_rng(1)
    flipped = rng.random(200) < 0.2
    scores = rng.normal(size=200) + 1.5 * flipped
    scores[:10] = 0.25  # ties
    assert roc_auc(torch.tensor(scores), torch.tensor(flipped)) == pytest.approx(roc_auc_score(flipped, scores))
    hand = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    flags = torch.tensor([True, False, True, False, False])
    assert recall_at_fraction(hand, flags, 0.2) == 0.5  # 1 row inspected, 1 of 2 found
    assert recall_at_fraction(hand, flags, 0.4) == 0.5
    assert recall_at_fraction(hand, flags, 0.6) == 1.0
    report = mislabel_report(hand, flags, fractions=(0.6,))
    assert report.auc == pytest.approx(5 / 6)  # pairs (pos > neg): 3 + 2 of 6
    assert report.recall.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        roc_auc(hand, torch.zeros(5, dtype=torch.bool))


def test_auc_difference_bootstrap() -> None:
    rng = np.random.default_rng(2)
    flipped = torch.tensor(rng.random(400) < 0.2)
    signal = torch.tensor(rng.normal(size=400)) + 2.0 * flipped
    weak = signal + torch.tensor(rng.normal(scale=3.0, size=400))
    better = auc_difference(signal, weak, flipped, resamples=300)
    assert better.difference == pytest.approx(roc_auc(signal, flipped) - roc_auc(weak, flipped))
    assert better.low <= better.difference <= better.high
    assert better.significant and better.low > 0  # a much stronger ranking wins beyond noise
    same = auc_difference(signal, signal + 1e-9 * torch.tensor(rng.normal(size=400)), flipped, resamples=300)
    assert not same.significant  # a ranking tied with itself is not a win
    with pytest.raises(ValueError):
        auc_difference(signal, weak[:10], flipped)


def test_leakage_ranks() -> None:
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.9],   # copy at 3 ties with row 1 (lower index first) → rank 2
        [NAN, 0.2, 0.3, 0.1],   # copy at 2 → rank 1 (NaN never ranks)
        [0.5, NAN, 0.4, 0.3],   # copy at 1 is NaN → rank N + 1
    ])
    result = leakage_detection(scores, torch.tensor([3, 2, 1]), ks=(2,))
    assert result.ranks.tolist() == [2, 1, 5]
    assert result.top1 == pytest.approx(1 / 3)
    assert result.top_k_rate[2] == pytest.approx(2 / 3)
    several = leakage_detection(scores, torch.tensor([[0, 1], [0, 2], [2, 3]]))
    assert several.ranks.tolist() == [1, 1, 2]


def test_proponent_retrieval_mrr_and_precision_at_k() -> None:
    """Hand-ranked: ties go to the lower index, NaN never ranks, k defaults to |R_q|."""
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.7, 0.2],  # order 0, 2, 3, 4, 1; proponents {2, 4} → ranks 2, 4
        [0.3, 0.5, 0.5, NAN, 0.1],  # order 1, 2, 0, 4 (3 is NaN); proponents {2, 3} → rank 2
        [NAN, NAN, NAN, NAN, 0.0],  # order 4; proponent {0} is NaN → rank N + 1 = 6
    ])
    relevant = torch.tensor([
        [False, False, True, False, True],
        [False, False, True, True, False],
        [True, False, False, False, False],
    ])
    assert proponent_ranks(scores, relevant).tolist() == [2, 2, 6]
    assert mean_reciprocal_rank(scores, relevant) == pytest.approx((1 / 2 + 1 / 2 + 1 / 6) / 3)
    # k_q = |R_q| = 2, 2, 1: top-2 {0, 2} → 1/2; top-2 {1, 2} → 1/2; top-1 {4} → 0.
    assert precision_at_k(scores, relevant) == pytest.approx(1 / 3)
    # k = 3: {0, 2, 3} → 1/3; {1, 2, 0} → 1/3; {4} and padding → 0.
    assert precision_at_k(scores, relevant, k=3) == pytest.approx(2 / 9)
    with pytest.raises(ValueError, match="at least one relevant row"):
        mean_reciprocal_rank(scores, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must both be"):
        precision_at_k(scores, relevant[:, :4])


def test_retrieval_difference_is_a_paired_bootstrap_over_queries() -> None:
    """Per-query reciprocal ranks 1 vs 1/2 for every query: difference 1/2, a degenerate interval."""
    relevant = torch.eye(4, dtype=torch.bool)
    first = torch.eye(4)  # each query's proponent ranked first
    second = torch.eye(4).roll(1, dims=1) * 2 + torch.eye(4)  # ranked second
    same = retrieval_difference(first, second, relevant)
    assert (same.difference, same.low, same.high) == pytest.approx((0.5, 0.5, 0.5))
    assert same.significant
    mixed = retrieval_difference(first, torch.cat([first[:2], second[2:]]), relevant, metric="precision")
    assert mixed.difference == pytest.approx(0.5) and mixed.low <= 0.5 <= mixed.high
    tie = retrieval_difference(first, first, relevant)
    assert tie.difference == 0.0 and not tie.significant
    with pytest.raises(ValueError, match="unknown metric"):
        retrieval_difference(first, first, relevant, metric="ndcg")


def _ridge(x: Tensor, y: Tensor, lam: float = 0.1) -> Callable[[Tensor], ModelAdapter]:
    def retrain(mask: Tensor) -> ModelAdapter:
        xs, ys = x[mask], y[mask]
        w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(x.shape[1], dtype=x.dtype), xs.T @ ys)
        layer = nn.Linear(x.shape[1], 1, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(w.T)
        return ModelAdapter(layer, RegressionTask())

    return retrain


def test_leave_one_out_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(30, 1, generator=gen, dtype=torch.float64)
    queries = Batch(torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
    retrain = _ridge(x, y)
    result = leave_one_out(retrain, 30, queries, rows=[0, 7])
    for j, row in enumerate([0, 7]):
        keep = torch.ones(30, dtype=torch.bool)
        keep[row] = False
        w_all = torch.linalg.solve(x.T @ x + 0.1 * torch.eye(3, dtype=x.dtype), x.T @ y)
        w_minus = torch.linalg.solve(x[keep].T @ x[keep] + 0.1 * torch.eye(3, dtype=x.dtype), x[keep].T @ y[keep])
        expected = ((queries.inputs @ w_minus) ** 2 - (queries.inputs @ w_all) ** 2).reshape(-1)
        torch.testing.assert_close(result.changes[:, j], expected)
    full = leave_one_out(retrain, 30, queries)
    assert loo_correlation(full.changes, full, query=1).pearson == pytest.approx(1.0)


def test_lds() -> None:
    subsets = sample_subsets(40, 25, fraction=0.5, seed=3)
    assert subsets.shape == (25, 40) and bool((subsets.sum(1) == 20).all())
    assert torch.equal(subsets, sample_subsets(40, 25, fraction=0.5, seed=3))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 40, generator=gen, dtype=torch.float64)
    perfect = -(subsets.double() @ scores.T)  # losses exactly as the scores predict
    assert linear_datamodeling_score(scores, subsets, perfect).mean == pytest.approx(1.0)
    noisy = perfect + torch.randn(25, 2, generator=gen, dtype=torch.float64)
    result = linear_datamodeling_score(scores, subsets, noisy)
    for q in range(2):
        expected = stats.spearmanr(-(subsets.double() @ scores[q]).numpy(), noisy[:, q].numpy())[0]
        assert float(result.per_query[q]) == pytest.approx(expected, abs=1e-12)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    losses = retrained_losses(_ridge(x, x[:, :1]), subsets[:3], Batch(x[:2], torch.zeros(2, 1, dtype=torch.float64)))
    assert losses.shape == (3, 2)
