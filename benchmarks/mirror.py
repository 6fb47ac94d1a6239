"""Exact influence in both directions for a model fitted to convergence (Q1, Q2).

A `ConvergedModel` is θ̂ = argmin R(θ) = mean CE + (l2/2)‖θ‖² on the digits training rows
(float64; L-BFGS, then Newton steps until the gradient vanishes). Its two exact influences,
both with the product's sign (positive = the training row supports the query):

- train→test (leave-one-out, `attribution.evaluation.loo`): `L(θ_{−i}, z_q) − L(θ̂, z_q)`;
- test→train (add the test point): `L(θ̂, z_i) − L(θ_{+q}, z_i)`, θ_{+q} refitted on the
  training rows plus z_q — adding the query lowers the loss of the rows that support it.

Refits solve ∇R'(θ) = 0 for the changed data set exactly, by the chord (simplified Newton)
iteration θ ← θ − H⁻¹∇R'(θ) from θ̂ with the Cholesky factor of H = ∇²R(θ̂) computed once:
one row changes H by O(1/N), so each step gains about log10(N) digits and a refit takes
a handful of gradient evaluations. The stopping rule is on the gradient itself
(max |∇R'| ≤ 1e-11), so a refit is exact to float64 rounding, not an approximation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from attribution.data import Batch, TensorTrainingSet
from attribution.model import ModelAdapter
from benchmarks.common import Split, adapter, digits_split, fit_lbfgs, mlp

GRADIENT_TOLERANCE = 1e-11
MAX_CHORD_STEPS = 100
MAX_NEWTON_STEPS = 20


@dataclass
class ConvergedModel:
    """θ̂ of `module` on `split`'s training rows, with exact refits on changed data sets.

    `convex=True` (logistic regression): θ̂ and every refit are Newton-exact (see the module
    docstring). `convex=False` (MLP): θ̂ is an L-BFGS local minimum (positive-definite
    Hessian checked) and test→train influence is the exact-Hessian infinitesimal form
    `(1/(N+1)) ∇L_iᵀ H⁻¹ ∇L_q` — the limit retraining tends to for one added row — because
    refitting a non-convex model to float64 precision costs minutes per query.
    """

    name: str
    split: Split
    module: nn.Module
    l2: float
    convex: bool = True
    _chol: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        x, y = self.split.x_train, self.split.y_train
        fit_lbfgs(self.module.train(), x, y, self.l2, max_iter=100 if self.convex else 2000)
        theta = self.flat()
        for _ in range(MAX_NEWTON_STEPS if self.convex else 1):  # Newton polish when convex
            chol, info = torch.linalg.cholesky_ex(self.hessian(theta, x, y))
            if int(info) != 0:
                raise RuntimeError(f"{self.name}: the Hessian at the fitted parameters is not positive definite")
            g = self.gradient(theta, x, y)
            if not self.convex or float(g.abs().max()) <= GRADIENT_TOLERANCE:
                break
            theta = theta - torch.cholesky_solve(g[:, None], chol)[:, 0]
        else:
            raise RuntimeError(f"{self.name}: Newton polish did not converge")
        self.load(theta)
        self._chol = chol

    # ----------------------------------------------------------------- objective
    def flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def _unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, p in self.module.named_parameters():
            out[name] = theta[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def objective(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """R(θ) = mean CE on `(x, y)` + (l2/2)‖θ‖²."""
        logits = functional_call(self.module, self._unflatten(theta), (x,))
        return F.cross_entropy(logits, y) + 0.5 * self.l2 * (theta ** 2).sum()

    def gradient(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return grad(self.objective)(theta, x, y)

    def hessian(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return torch.autograd.functional.hessian(lambda t: self.objective(t, x, y), theta, vectorize=True)

    def load(self, theta: Tensor, module: nn.Module | None = None) -> nn.Module:
        """Copy `theta` `[P]` into `module` (default: θ̂'s own module), in place; returns it."""
        target = self.module if module is None else module
        with torch.no_grad():
            for p, value in zip(target.parameters(), self._unflatten(theta).values(), strict=True):
                p.copy_(value)
        return target.eval()

    # ----------------------------------------------------------------- refits
    @property
    def model(self) -> ModelAdapter:
        return adapter(self.module)

    @property
    def train(self) -> TensorTrainingSet:
        return self.split.train

    def refit(self, x: Tensor, y: Tensor) -> ModelAdapter:
        """The exact minimiser of R on `(x, y)` (convex models): chord iterations from θ̂, with
        the Hessian refreshed (a true Newton step) whenever a step gains less than 2×."""
        if not self.convex:
            raise ValueError(f"{self.name} is not convex: exact refits are not available")
        theta, chol, previous = self.flat(), self._chol, float("inf")
        for _ in range(MAX_CHORD_STEPS):
            g = self.gradient(theta, x, y)
            size = float(g.abs().max())
            if size <= GRADIENT_TOLERANCE:
                return adapter(self.load(theta, copy.deepcopy(self.module)))
            if size > 0.5 * previous:  # chord progress stalls: take a true Newton step
                chol = torch.linalg.cholesky(self.hessian(theta, x, y))
            previous = size
            theta = theta - torch.cholesky_solve(g[:, None], chol)[:, 0]
        raise RuntimeError(f"{self.name}: refit did not converge in {MAX_CHORD_STEPS} chord steps")

    def retrain(self, mask: Tensor) -> ModelAdapter:
        """The `loo.Retrain` callable: refit on the rows where `mask` `[N]` is true."""
        return self.refit(self.split.x_train[mask], self.split.y_train[mask])

    def highest_loss_test_points(self, count: int, skip: int = 0) -> Tensor:
        """Indices `[count]` of the test points with the highest loss, after the first `skip`."""
        test = Batch(self.split.x_test, self.split.y_test)
        with torch.inference_mode():
            losses = self.model.loss(test)
        return torch.argsort(losses, descending=True)[skip: skip + count]

    def test_to_train(self, test_index: int) -> Tensor:
        """`[N]` float64 `L(θ̂, z_i) − L(θ_{+q}, z_i)` for test point q added to the training rows
        (exact refit when convex, else the exact-Hessian infinitesimal form; class docstring)."""
        split = self.split
        query = split.test_batch([test_index])
        if not self.convex:
            model = self.model
            g_q = model.per_sample_grads(query)[0].double()
            solved = torch.cholesky_solve(g_q[:, None], self._chol)[:, 0]
            g_train = model.per_sample_grads(split.train.all).double()
            return g_train @ solved / (len(split.y_train) + 1)
        added = self.refit(torch.cat([split.x_train, query.inputs]),  # type: ignore[list-item]
                           torch.cat([split.y_train, query.targets]))
        with torch.inference_mode():
            before = self.model.loss(split.train.all).double()
            after = added.loss(split.train.all).double()
        return before - after


def logistic_regression(l2: float = 1e-3, n_train: int = 1200, seed: int = 0) -> ConvergedModel:
    """Multinomial logistic regression 64→10 on digits (float64), fitted to convergence."""
    split = digits_split(n_train=n_train, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    return ConvergedModel("logistic regression", split, nn.Linear(64, 10).double(), l2)


def converged_mlp(l2: float = 1e-3, hidden: int = 16, n_train: int = 1200, seed: int = 0) -> ConvergedModel:
    """64-`hidden`-10 tanh MLP on digits (float64), fitted to a local minimum."""
    split = digits_split(n_train=n_train, seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    return ConvergedModel(f"MLP 64-{hidden}-10", split, mlp([64, hidden, 10]).double(), l2, convex=False)
