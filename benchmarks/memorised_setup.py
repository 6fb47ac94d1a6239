"""A small tabular MLP trained to memorise, with test points planted in its training set.

`make_classification` (12 features, 20% flipped labels; generated offline by scikit-learn),
standardised; `planted` of the held-out points are inserted at random positions of the
training set, then a 12-64-64-2 ReLU MLP is trained full-batch with AdamW (light decoupled
weight decay) until it fits every row: the noisy labels force large weights, so many rows —
planted copies included — end at margins where the float32 loss gradient underflows (its
squared norm beyond a margin of ~45, the gradient itself beyond ~87). Querying a planted
point, its exact copy in the training set is the row to find (issue 12, item 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import make_classification
from torch import Tensor, nn

FEATURES = 12
HIDDEN = 64


@dataclass(frozen=True)
class MemorisedProblem:
    module: nn.Module
    x_train: Tensor  # [N + planted, FEATURES] float32, planted copies included
    y_train: Tensor  # [N + planted] int64
    x_query: Tensor  # [planted, FEATURES] the planted points
    y_query: Tensor  # [planted]
    copies: Tensor  # [planted] position of each query's copy in the training set

    def margins(self) -> Tensor:
        """`[N]` float64 margins `z_y − z_{other}` of the training rows."""
        with torch.no_grad():
            logits = self.module(self.x_train).double()
        own = logits.gather(1, self.y_train[:, None])[:, 0]
        return own - logits.scatter(1, self.y_train[:, None], float("-inf")).amax(1)


def memorised_tabular(*, seed: int = 0, n_train: int = 300, planted: int = 20, steps: int = 2000,
                      lr: float = 3e-2, weight_decay: float = 1e-4) -> MemorisedProblem:
    """The trained problem (deterministic for a seed; single-threaded training)."""
    x, y = make_classification(n_samples=n_train + planted, n_features=FEATURES, n_informative=6, n_redundant=2,
                               flip_y=0.2, class_sep=0.8, random_state=seed)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    order = np.random.default_rng(seed).permutation(n_train + planted)
    x_train, y_train = torch.from_numpy(x[order]), torch.from_numpy(y[order]).long()
    copies = torch.from_numpy(np.argsort(order)[n_train:]).long()
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                           nn.Linear(HIDDEN, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x_train), y_train).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return MemorisedProblem(module.eval(), x_train, y_train, torch.from_numpy(x[n_train:]),
                            torch.from_numpy(y[n_train:]).long(), copies)
