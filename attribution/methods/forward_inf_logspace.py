"""Forward-INF on memorised rows: unlearning directions and loss changes in log space.

A memorised classification row has `L_i ≈ e^{−m_i}`; past a margin of ~87 (fp32) both its
loss and its gradient are exactly 0, so (i) a memorised query gives `normalized_sgd` a zero
gradient and no step, and (ii) every loss change `L(θ_K, z_i) − L(θ̂, z_i)` of a memorised row
is 0 — the planted copy of a memorised query scores 0 under relative scores too. Both only
need quantities that are representable in log space:

- the unlearning step of `normalized_sgd` needs the direction of `Σ_q ∇L_q`: it is taken on
  the surrogate `Σ_q (s_q / max s) ⟨f_q, stop_grad(w̃_q)⟩` (`attribution.gradient_directions`),
  whose gradient is a positive multiple of `Σ_q ∇L_q` at any margin;
- the loss change is `L_0 (e^{ℓ_K − ℓ_0} − 1)` with `ℓ = log L` (`Task.per_sample_log_loss`)
  and `L_0 = e^{ℓ_0}`, formed in float64; relative scores divide it by `D_i` (exact norms from
  the gradient directions) before anything is cast to float32.
"""

from __future__ import annotations

import copy
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from attribution.gradient_directions import direction_surrogate
from attribution.model import ModelAdapter
from attribution.tasks import Task


class LogLossTask(Task):
    """The wrapped task's `log ℓ` as its per-sample "loss" (for sweeps, never differentiated)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.name = task.name

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        log_loss = self.task.per_sample_log_loss(outputs, targets)
        if log_loss is None:
            raise TypeError(f"task {self.task.name} has no log-space loss")
        return log_loss


_LOG_SPACE_TASKS: WeakKeyDictionary[Task, bool] = WeakKeyDictionary()


def supports_log_space(model: ModelAdapter) -> bool:
    """True when the task gives both log-space losses and gradient directions (classification);
    probed once per (hashable) task object."""
    task = model.task
    memo = type(task).__hash__ is not None
    known = _LOG_SPACE_TASKS.get(task) if memo else None
    if known is None:
        probe_out, probe_target = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
        known = (task.per_sample_log_loss(probe_out, probe_target) is not None
                 and task.output_gradient_direction(probe_out, probe_target) is not None)
        if memo:
            _LOG_SPACE_TASKS[task] = known
    return known


def with_task(model: ModelAdapter, task: Task) -> ModelAdapter:
    """The same module and tracked parameters (`model.param_names`) under another task."""
    out = copy.copy(model)
    out.task = task
    return out


def direction_model(model: ModelAdapter) -> ModelAdapter:
    """The model whose "loss" gradient is the scale-weighted direction of the real one's."""
    return with_task(model, direction_surrogate(model.task, weighted=True))


def log_loss_model(model: ModelAdapter) -> ModelAdapter:
    return with_task(model, LogLossTask(model.task))


def log_space_change(after: Tensor, base: Tensor) -> Tensor:
    """`[Q, N]` float64 `L_K − L_0 = e^{ℓ_0} expm1(ℓ_K − ℓ_0)` from log-losses `after` `[Q, N]`, `base` `[N]`."""
    base = base.double().unsqueeze(0)
    return base.exp() * torch.expm1(after.double() - base)
