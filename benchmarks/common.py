"""Data, tiny models and their training for the studies, all seeded and offline.

Data come from scikit-learn's bundled sets (`load_digits`: 1,797 8×8 images scaled to
[0, 1]; `load_wine`: 178 rows of 13 standardised features) or are synthetic. Models are
trained by full-batch optimisers so a run is a deterministic function of its seed:
`fit_lbfgs` minimises `mean CE + (l2/2)‖θ‖²` to convergence (convex models, and the
warm-started refits of leave-one-out studies); `fit_adam` trains non-convex models and can
keep checkpoints θ_c with their learning rates η_c for TracIn.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_wine
from torch import Tensor, nn

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.tasks import ClassificationTask, RegressionTask, Task


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """Train/test tensors: `x_*` `[N, ...]` float, `y_*` `[N]` int64 (or `[N, 1]` float)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def train(self) -> TensorTrainingSet:
        return TensorTrainingSet(self.x_train, self.y_train)

    def test_batch(self, index: Tensor | list[int]) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Batch(self.x_test[idx], self.y_test[idx])


def _permuted_split(x: Tensor, y: Tensor, n_train: int, seed: int) -> Split:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return Split(x[tr], y[tr], x[te], y[te])


def digits_split(n_train: int = 1200, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """Digits scaled to [0, 1], flat `[N, 64]` rows (`small_cnn` unflattens them itself)."""
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=dtype)
    y = torch.tensor(data.target, dtype=torch.long)
    return _permuted_split(x, y, n_train, seed)


def wine_split(n_train: int = 130, seed: int = 0) -> Split:
    """Wine, features standardised with the whole set's mean and std."""
    data = load_wine()
    x = (data.data - data.data.mean(0)) / (data.data.std(0) + 1e-6)
    return _permuted_split(torch.tensor(x, dtype=torch.float32),
                           torch.tensor(data.target, dtype=torch.long), n_train, seed)


@dataclass
class LinearProblem:
    """Synthetic `y = xᵀw + ε` with `x ~ N(0, I)`, weights `w ~ N(0, σs² I)`, noise `ε ~ N(0, σn²)`."""

    x_train: Tensor  # [N, D] float64
    y_train: Tensor  # [N, 1]
    x_test: Tensor  # [M, D]
    y_test: Tensor  # [M, 1]


def linear_problem(n_train: int, n_test: int, dim: int, noise_std: float, signal_std: float,
                   seed: int) -> LinearProblem:
    gen = torch.Generator().manual_seed(seed)
    w = signal_std * torch.randn(dim, 1, generator=gen, dtype=torch.float64)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        return x, x @ w + noise_std * torch.randn(n, 1, generator=gen, dtype=torch.float64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return LinearProblem(x_tr, y_tr, x_te, y_te)


# --------------------------------------------------------------------------- models
def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Fully connected net with `sizes = [in, hidden..., out]`."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def small_cnn(channels: int = 8, classes: int = 10) -> nn.Sequential:
    """For flat `[B, 64]` digits: Unflatten → Conv(1→c, 3×3) → ReLU → Conv(c→2c, 3×3) → ReLU →
    2×2 max-pool → Linear. Taking flat rows lets MLP and CNN share one training set."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * channels * 16, classes),
    )


def l2_penalty(module: nn.Module) -> Tensor:
    return sum((p ** 2).sum() for p in module.parameters())  # type: ignore[return-value]


# --------------------------------------------------------------------------- training
def fit_lbfgs(module: nn.Module, x: Tensor, y: Tensor, l2: float, *, max_iter: int = 1000) -> nn.Module:
    """Minimise mean cross-entropy + (l2/2)‖θ‖² to convergence with full-batch L-BFGS, in place."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        total = F.cross_entropy(module(x), y) + 0.5 * l2 * l2_penalty(module)
        total.backward()
        return total

    opt.step(closure)
    return module.eval()


@dataclass
class Trajectory:
    """Checkpoints θ_c saved during training with the learning rate η_c in force after each."""

    modules: list[nn.Module] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


def fit_adam(module: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 300, lr: float = 1e-2,
             weight_decay: float = 1e-4, seed: int = 0, checkpoints: int = 0) -> tuple[nn.Module, Trajectory]:
    """Full-batch Adam with decoupled L2 `weight_decay`, in place.

    With `checkpoints = C > 0` keeps C evenly spaced copies of the model (the last one the
    final model) and the learning rate used, for TracIn's `Σ_c η_c ∇L_c(z_q)·∇L_c(z_i)`.
    """
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    keep = {round(epochs * (c + 1) / checkpoints) for c in range(checkpoints)} if checkpoints else set()
    trajectory = Trajectory()
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
        if epoch in keep:
            trajectory.modules.append(copy.deepcopy(module).eval())
            trajectory.lrs.append(lr)
    return module.eval(), trajectory


def accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- library glue
def adapter(module: nn.Module, task: Task | None = None) -> ModelAdapter:
    """The core library's view of a trained model (classification unless told)."""
    return ModelAdapter(module, task or ClassificationTask())


def regression_adapter(module: nn.Module) -> ModelAdapter:
    return ModelAdapter(module, RegressionTask())


def fit_context(name: str, trajectory: Trajectory | None = None, task: Task | None = None) -> FitContext:
    """A fresh `FitContext` (in-memory artifact store) carrying TracIn checkpoints if given."""
    context = FitContext(fingerprint=f"bench:{name}", store=InMemoryArtifacts())
    if trajectory is not None:
        context.checkpoints = [adapter(m, task) for m in trajectory.modules]
        context.checkpoint_lrs = list(trajectory.lrs)
    return context
