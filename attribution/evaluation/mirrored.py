"""The mirrored influence hypothesis check (Forward-INF paper, Table 1).

For a test point z and training rows z_i, train→test influence is the change of L(z) when
z_i is removed (leave-one-out, `loo.py`); test→train influence is the change of L(z_i) when
z is added to (or, mirrored, unlearned from) the training set. The hypothesis says the two
vectors `[N]` are strongly correlated; this module reports Pearson and Spearman.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from attribution.evaluation.stats import pearson, spearman


@dataclass(frozen=True)
class Correlation:
    pearson: float
    spearman: float


def mirrored_correlation(train_to_test: Tensor, test_to_train: Tensor) -> Correlation:
    """Pearson/Spearman between the two influence vectors `[N]` of one test point."""
    if train_to_test.shape != test_to_train.shape:
        raise ValueError(f"shapes differ: {tuple(train_to_test.shape)} vs {tuple(test_to_train.shape)}")
    return Correlation(pearson(train_to_test, test_to_train), spearman(train_to_test, test_to_train))
