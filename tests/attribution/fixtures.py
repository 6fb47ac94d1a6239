"""Tiny models trained in seconds on scikit-learn's bundled data sets (offline).

`digits_lr`: L2-regularised multinomial logistic regression (nn.Linear 64→10) fitted with
L-BFGS to convergence; `digits_mlp`: 64-32-10 MLP; `wine_mlp`: 13-16-16-3 MLP;
`digits_leakage`: logistic regression trained on a training set into which 20 test
points were copied (their positions recorded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_wine
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.model import ModelAdapter
from attribution.tasks import ClassificationTask


@dataclass
class Trained:
    module: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    l2: float

    @property
    def adapter(self) -> ModelAdapter:
        return ModelAdapter(self.module, ClassificationTask())

    @property
    def train(self) -> TensorTrainingSet:
        return TensorTrainingSet(self.x_train, self.y_train)

    def test_batch(self, index: list[int] | Tensor) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(self.x_test[idx], self.y_test[idx])


def standardized(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def split_digits(seed: int = 0, n_train: int = 1200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def fit_lbfgs(module: nn.Module, x: Tensor, y: Tensor, l2: float, max_iter: int = 500) -> nn.Module:
    """Minimise mean CE + (l2/2)·‖θ‖² to convergence (full batch L-BFGS)."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y) + 0.5 * l2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return module.eval()


def fit_adam(module: nn.Module, x: Tensor, y: Tensor, epochs: int = 300, lr: float = 1e-2,
             weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    return module.eval()


def digits_lr(l2: float = 1e-3, seed: int = 0) -> Trained:
    x_tr, y_tr, x_te, y_te = split_digits(seed)
    torch.manual_seed(seed)
    module = fit_lbfgs(nn.Linear(64, 10), x_tr, y_tr, l2)
    return Trained(module, x_tr, y_tr, x_te, y_te, l2)


def digits_mlp(seed: int = 0, hidden: int = 32) -> Trained:
    x_tr, y_tr, x_te, y_te = split_digits(seed)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    return Trained(fit_adam(module, x_tr, y_tr, seed=seed), x_tr, y_tr, x_te, y_te, 1e-4)


def wine_mlp(seed: int = 0) -> Trained:
    data = load_wine()
    x = torch.tensor(standardized(data.data), dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:130], perm[130:]
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    return Trained(fit_adam(module, x[tr], y[tr], epochs=300, seed=seed), x[tr], y[tr], x[te], y[te], 1e-4)


@dataclass
class Leakage:
    trained: Trained
    query_index: Tensor  # [Q] rows of x_test used as queries
    copy_index: Tensor  # [Q] positions of their exact copies in the training set


def digits_leakage(num_copies: int = 20, l2: float = 1e-3, seed: int = 0) -> Leakage:
    """20 test points copied into the training set at random positions; LR refitted on it."""
    x_tr, y_tr, x_te, y_te = split_digits(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    query_index = torch.randperm(len(y_te), generator=gen)[:num_copies]
    x_all = torch.cat([x_tr, x_te[query_index]])
    y_all = torch.cat([y_tr, y_te[query_index]])
    order = torch.randperm(len(y_all), generator=gen)
    x_all, y_all = x_all[order], y_all[order]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    copy_index = inverse[len(y_tr):]
    torch.manual_seed(seed)
    module = fit_lbfgs(nn.Linear(64, 10), x_all, y_all, l2)
    return Leakage(Trained(module, x_all, y_all, x_te, y_te, l2), query_index, copy_index)
