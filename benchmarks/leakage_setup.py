"""Digits with test points leaked into the training set (Q3), for an MLP and a small CNN.

`leaked_digits` copies `evaluated + validation` test points into the training rows at
seeded random positions; the first `evaluated` are scored, the others only choose
hyperparameters. A model trained on the leaked set then has, for each such test point,
an exact duplicate among its training rows whose position is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.model import ModelAdapter
from benchmarks.common import Trajectory, accuracy, adapter, digits_split, fit_adam, mlp, small_cnn


@dataclass
class LeakedDigits:
    x_train: Tensor  # [N, ...] training rows, the copies included
    y_train: Tensor  # [N]
    x_test: Tensor
    y_test: Tensor
    evaluated: Tensor  # [E] test indices scored
    validation: Tensor  # [V] test indices for hyperparameter choice
    copy_of: dict[int, int]  # test index → training position of its copy

    @property
    def train(self) -> TensorTrainingSet:
        return TensorTrainingSet(self.x_train, self.y_train)

    def queries(self, index: Tensor) -> Batch:
        return Batch(self.x_test[index], self.y_test[index])

    def copies(self, index: Tensor) -> Tensor:
        return torch.tensor([self.copy_of[int(i)] for i in index], dtype=torch.long)


def leaked_digits(n_train: int, evaluated: int, validation: int, *, seed: int = 0) -> LeakedDigits:
    split = digits_split(n_train=n_train, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    leaked = torch.randperm(len(split.y_test), generator=gen)[: evaluated + validation]
    x_all = torch.cat([split.x_train, split.x_test[leaked]])
    y_all = torch.cat([split.y_train, split.y_test[leaked]])
    order = torch.randperm(len(y_all), generator=gen)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    copy_of = {int(t): int(position[n_train + k]) for k, t in enumerate(leaked)}
    return LeakedDigits(x_all[order], y_all[order], split.x_test, split.y_test,
                        leaked[:evaluated], leaked[evaluated:], copy_of)


@dataclass
class TrainedModel:
    name: str
    module: nn.Module
    trajectory: Trajectory  # TracIn checkpoints
    test_accuracy: float

    @property
    def model(self) -> ModelAdapter:
        return adapter(self.module)


def train_models(data: LeakedDigits, *, epochs: int, hidden: int = 64, channels: int = 8,
                 seed: int = 0) -> list[TrainedModel]:
    """MLP 64-`hidden`-10 (ReLU) and the small CNN, full-batch AdamW, 5 TracIn checkpoints each."""
    out = []
    for name, build in ((f"MLP 64-{hidden}-10", lambda: mlp([64, hidden, 10], nn.ReLU)),
                        (f"CNN (conv {channels}, conv {2 * channels}, max-pool, linear)",
                         lambda: small_cnn(channels))):
        torch.manual_seed(seed)
        module, trajectory = fit_adam(build(), data.x_train, data.y_train, epochs=epochs, seed=seed, checkpoints=5)
        out.append(TrainedModel(name, module, trajectory, accuracy(module, data.x_test, data.y_test)))
    return out
