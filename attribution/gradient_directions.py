"""Per-sample loss gradients split into an order-1 direction and a log scale.

A model trained to memorise puts its training rows at margins `m` where the classification
loss gradient `g = ∇_θ ℓ = J_fᵀ (p − e_y)` is of order `e^{−m}`: in float32 its squared norm
underflows once `m` exceeds ~45 and the gradient itself is exactly zero beyond ~87, so a
cosine or a relative (RelatIF) score — which need only the direction of `g` — loses the row
(an exact copy of a memorised query is no longer ranked first). Following the task's
factorisation `∂ℓ/∂f = s w̃` (`Task.output_gradient_direction`, computed in log space),

    g_b = s_b g̃_b,      g̃_b = J_{f_b}ᵀ w̃_b,      log s_b exact,

`gradient_directions` back-propagates the order-1 cotangent `w̃_b` instead of `p − e_y`
(through the surrogate loss `⟨f_b, stop_grad(w̃_b)⟩`, with the model's own per-sample gradient
machinery: `vmap` for eager modules, batched autograd for TorchScript) and returns `log s_b`
beside it. `g̃` equals `∇ℓ / s` up to rounding wherever `∇ℓ` is representable, and keeps its
direction where it is not. Tasks without the factorisation get `g̃ = g`, `log s = 0`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.data import Batch
from attribution.model import ModelAdapter
from attribution.tasks import Task


class _DirectionSurrogate(Task):
    """`ℓ̃(f_b, y_b) = ⟨f_b, w̃_b⟩` with `w̃_b` held constant, so `∇_θ ℓ̃_b = J_fᵀ w̃_b = ∇_θ ℓ_b / s_b`;
    `weighted`: times `s_b / max_batch s` (held constant), so `∇_θ Σ_b ℓ̃_b ∝ ∇_θ Σ_b ℓ_b`."""

    def __init__(self, task: Task, *, weighted: bool) -> None:
        self.task = task
        self.name = task.name
        self.weighted = weighted

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        factored = self.task.output_gradient_direction(outputs.detach(), targets)
        if factored is None:
            raise TypeError(f"task {self.task.name} has no output-gradient direction")
        direction, log_scale = factored
        flat = outputs.reshape(outputs.shape[0], -1)
        surrogate = (flat.to(direction.dtype) * direction).sum(dim=1)
        if not self.weighted:
            return surrogate
        return surrogate * (log_scale - log_scale.max()).exp().to(surrogate.dtype)


def direction_surrogate(task: Task, *, weighted: bool = False) -> Task:
    """The surrogate task of `task` (see `_DirectionSurrogate`)."""
    return _DirectionSurrogate(task, weighted=weighted)


def gradient_directions(model: ModelAdapter, batch: Batch, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """`([B, P] g̃, [B] float64 log s)` with `∇_θ ℓ(z_b) = s_b g̃_b` (module docstring)."""
    batch = batch.to(model.device)
    with torch.no_grad():
        outputs = model.task.forward(model.module, batch.inputs)
    factored = model.task.output_gradient_direction(outputs, batch.targets)
    if factored is None:
        return model.per_sample_grads(batch, chunk_size), torch.zeros(len(batch), dtype=torch.float64)
    surrogate = ModelAdapter(model.module, direction_surrogate(model.task), device=model.device, layers=model.layers)
    return surrogate.per_sample_grads(batch, chunk_size), factored[1].cpu()


def loss_gradient_directions(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, P]` directions `g̃_b` alone (a `BatchGradients` for scores that only need directions)."""
    return gradient_directions(model, batch)[0]


def scaled_norms(directions: Tensor, log_scale: Tensor) -> dict[str, Tensor]:
    """`{"l2_squared", "l1"}` `[B]` float64 `‖g_b‖₂²`, `‖g_b‖₁` of `g_b = s_b g̃_b`, representable down
    to `s_b ≈ 1e-154` (the squares' float64 limit) instead of float32's ~1e-19."""
    g = directions.double().cpu()
    scale = log_scale.double().exp()
    return {"l2_squared": g.pow(2).sum(1) * scale.pow(2), "l1": g.abs().sum(1) * scale}


def weighted_direction(directions: Tensor, log_scale: Tensor) -> Tensor:
    """`[1, P]` a positive multiple of `Σ_b g_b = Σ_b s_b g̃_b` (the mean gradient's direction),
    weights `s_b / max s` formed in log space."""
    weights = (log_scale.double() - log_scale.double().max()).exp().to(directions.device, directions.dtype)
    return (weights[:, None] * directions).sum(0, keepdim=True)
