"""Newton-step unlearning for Forward-INF: the influence-function parameter update, then
Forward-INF's forward sweep.

Algorithm 1 unlearns the query by plain gradient steps, whose first-order effect on row i
is α∇Lᵢᵀ∇L_q: no inverse curvature, so it tracks the gradient dot product rather than the
exact test→train influence. The certified-removal / influence-function update (Koh & Liang
2017, eq. 1–2; Guo, Goldstein, Hannun & van der Maaten 2020, "Certified data removal",
eq. 3) takes one Newton step on the query loss instead,

    s_q = (G + λI)⁻¹ ∇_θ L(θ̂, z_q)                                        [Q, P]
    θ'_q = θ̂ ± α s_q          (+: ascent, the query removed; −: descent, the query added)
    score_i = ±(L(θ'_q, z_i) − L(θ̂, z_i)) = α ∇Lᵢᵀ (G + λI)⁻¹ ∇L_q + O(α²)      [Q, N]

with G the Gauss-Newton/Fisher curvature or the Hessian H (`curvature: hessian`, Koh & Liang's
own choice) and λ the damping of `attribution.curvature` / `attribution.ihvp` (the
estimator's fitted state is the influence method's cached artifact, shared with it). The first-order term is the influence function's score times α; the
training set is still only swept forward (no per-sample training gradients), so a query
costs one iHVP on the cached fit plus one forward sweep.

α. Adding the Q query samples to the objective with the weight 1/N of a training row,
(1/N)(Σᵢ Lᵢ + Σ_q L_q) + (λ/2)‖θ‖² (Koh & Liang's upweighting by ε = 1/N), moves its
minimiser by one Newton step θ̂ − (1/N)H⁻¹Σ_q∇L_q + O(1/N²): descent with α = Q/N on the
mean query loss; ascent with the same α removes them (Guo et al.'s removal step). So α = Q/N
makes score_i ≈ L(θ̂, zᵢ) − L(θ₊q, zᵢ), the exact test→train influence in its own units
(additive over query samples; self-influence (1/N)∇Lᵢᵀ(G + λI)⁻¹∇Lᵢ).

The literal step θ̂ ± (Q/N)s_q is not first order, though: for a high-loss query and weak
damping it moves θ by a large fraction of ‖θ̂‖ (29% for the 10 highest-loss digits test
points, LR with λ = 1e-3, N = 400) and its loss changes correlate worse with the exact refit
than the first-order term does (Pearson 0.86 vs 0.986 there; MLP 0.32 vs 0.91). Unset `lr`,
the step is therefore a finite difference along s_q of length ρ‖θ̂‖₂ (ρ = `STEP_FRACTION`
= 1e-3, any θ̂; ρ when θ̂ = 0), t_q = ρ‖θ̂‖/‖s_q‖, and the loss change is rescaled to α = Q/N:

    score_i = (α/t_q)·±(L(θ̂ ± t_q s_q, zᵢ) − L(θ̂, zᵢ)) = α ∇Lᵢᵀ(G + λI)⁻¹∇L_q + O(α t_q).

ρ scan on the quick Q2 setup (N = 400, 10 highest-loss queries, exact iHVP, λ = l2): Pearson
with the exact target is flat over ρ ∈ [1e-4, 1e-3] in fp32 and fp64 (LR 0.986, MLP 0.912),
slightly lower at ρ = 1e-5 in fp32 (0.985 / 0.911: rounding of Lᵢ, ~1e-7·Lᵢ) and lower at
ρ ≥ 1e-2 (second-order terms: 0.983 / 0.908; at 1e-1 0.93 / 0.66). 1e-3 is the largest value
of the flat range (the most margin above fp32 rounding), not a tuned optimum. A step of fixed length also resolves a memorised query, whose ‖s_q‖ can
be ~1e-17 (as `normalized_sgd` does for Algorithm 1). An explicit `lr` is the literal step
θ̂ ± lr·s_q and the scores are its loss changes (score ≈ lr·∇Lᵢᵀ(G + λI)⁻¹∇L_q).

RelatIF. score(q, i) ≈ α⟨gᵢ, g_q⟩_M in the inner product M = (G + λI)⁻¹, so
Dᵢ² = α gᵢᵀ M gᵢ (the first-order self-influence) bounds score / Dᵢ ≤ √α ‖g_q‖_M by
Cauchy–Schwarz, with equality for an exact copy (gᵢ = g_q) — RelatIF's own normaliser
(Barshan et al. 2020) for the influence function; α is that of one row (`lr`, or 1/N).
gᵢᵀMgᵢ is solved exactly per row in float64 (one iHVP per row, like the influence method's
self-influence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.data import Batch, TensorTrainingSet, TrainingSet
from attribution.ihvp import IHVPEstimator
from attribution.methods.forward_inf_sweep import BatchLosses, copies_losses, sweep
from attribution.methods.forward_inf_unlearning import StackedModel
from attribution.methods.influence import query_gradients
from attribution.model import ModelAdapter, Params

STEP_FRACTION = 1e-3
"""ρ: the default finite-difference step moves the tracked parameters by ρ‖θ̂‖₂."""


@dataclass(frozen=True)
class NewtonStep:
    """Step sizes and score scales of the Newton step (module docstring).

    `lr` given: the literal step θ̂ ± lr·s_q, scores are the loss changes themselves.
    `lr` None: a finite-difference step of length ρ‖θ̂‖ along each s_q, the loss change
    rescaled to α = `alpha` (Q/N), so scores estimate α∇Lᵢᵀ(G + λI)⁻¹∇L_q in its own units.
    """

    alpha: float
    lr: float | None
    sign: float
    fraction: float = STEP_FRACTION

    def steps(self, model: ModelAdapter, directions: Tensor) -> tuple[Tensor, Tensor]:
        """`([Q], [Q])` float64: the signed step t_q along s_q and the factor its loss change is
        multiplied by (1 for an explicit `lr`, else α/|t_q|; 0 for a zero direction s_q = 0)."""
        count = directions.shape[0]
        if self.lr is not None:
            ones = torch.ones(count, dtype=torch.float64)
            return self.sign * self.lr * ones, ones
        norms = directions.double().norm(dim=1).cpu()
        theta_norm = float(model.flat_params().double().norm())
        length = self.fraction * (theta_norm if theta_norm > 0 else 1.0)
        moving = norms > 0
        t = torch.where(moving, length / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        scale = torch.where(moving, self.alpha / t.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        return self.sign * t, scale


def removal_scale(num_queries: int, num_rows: int) -> float:
    """α = Q/N: one Newton step of removing (adding) Q samples from (to) N rows."""
    if num_rows < 1:
        raise ValueError("the training set is empty")
    return num_queries / num_rows


def newton_directions(model: ModelAdapter, estimator: IHVPEstimator, queries: Batch, *,
                      per_sample: bool) -> Tensor:
    """`[Q, P]` (per_sample) or `[1, P]` (joint: the mean query loss) rows `(G + λI)⁻¹ ∇L_q`."""
    return estimator.solve(query_gradients(model, queries, per_sample=per_sample))


def moved_parameters(model: ModelAdapter, directions: Tensor, steps: Tensor) -> Tensor:
    """`[Q, P]` flat parameter sets θ̂ + t_q·s_q (`steps` `[Q]`), in the model's dtype; the
    sum is formed in float64 and rounded once."""
    theta = model.flat_params()
    moved = theta.double()[None] + steps.to(directions.device, torch.float64)[:, None] * directions.double()
    return moved.to(theta.dtype)


def stacked(model: ModelAdapter, flat: Tensor) -> Params:
    """`[Q, P]` → `{name: [Q, *shape]}` for `StackedModel`."""
    out: Params = {}
    offset = 0
    for name, p in model.params().items():
        out[name] = flat[:, offset: offset + p.numel()].reshape(flat.shape[0], *p.shape).contiguous()
        offset += p.numel()
    return out


def parameter_copy(model: ModelAdapter, flat: Tensor) -> ModelAdapter:
    """A copy of `model` with its tracked parameters set to `flat` `[P]`, ready to evaluate
    (parameters not requiring grad, as `unlearn_copy` leaves them; TorchScript included)."""
    copy = model.clone()
    copy.load_flat(flat)
    for param in copy.module.parameters():
        param.requires_grad_(False)
    return copy


def losses_at(model: ModelAdapter, flat: Tensor) -> BatchLosses:
    """Batch → `[Q, B]` losses of the Q parameter sets `flat` `[Q, P]` (vmap for eager
    modules, one copy per set for TorchScript)."""
    if model.is_scripted:
        return copies_losses([parameter_copy(model, flat[q]) for q in range(flat.shape[0])])
    return StackedModel(model).batch_losses(stacked(model, flat))


def own_losses_after_newton(model: ModelAdapter, estimator: IHVPEstimator, rows: Batch, step: NewtonStep,
                            amp_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """`([B], [B])`: L(θ̂ + t_i(G + λI)⁻¹∇Lᵢ, zᵢ), each row's loss after a Newton step on itself
    alone, and the factor of its loss change (`NewtonStep.steps`)."""
    directions = estimator.solve(model.per_sample_grads(rows))
    steps, scale = step.steps(model, directions)
    flat = moved_parameters(model, directions, steps)
    if model.is_scripted:
        copies = [parameter_copy(model, flat[r]) for r in range(len(rows))]

        def evaluate(batch: Batch) -> Tensor:
            return torch.stack([c.loss(batch.slice(r, r + 1))[0] for r, c in enumerate(copies)])[None]
    else:
        stacked_model, params = StackedModel(model), stacked(model, flat)

        def evaluate(batch: Batch) -> Tensor:
            return stacked_model.own_losses(params, batch)[None]

    one_batch = TensorTrainingSet(rows.inputs, rows.targets)
    return sweep(evaluate, one_batch, batch_size=len(rows), device=model.device, amp_dtype=amp_dtype)[0], scale


def newton_self_influence(model: ModelAdapter, estimator: IHVPEstimator, train: TrainingSet, base: Tensor,
                          step: NewtonStep, *, rows: int, amp_dtype: torch.dtype | None,
                          progress: Callable[[float], None]) -> Tensor:
    """`[N]` every row unlearned alone by one Newton step, its own loss change
    (≈ α∇Lᵢᵀ(G + λI)⁻¹∇Lᵢ, sign and scale as in the scores), `rows` rows per solve."""
    total = len(train)
    out = torch.empty(total, dtype=torch.float32)
    for start, chunk in train.batches(rows):
        chunk = chunk.to(model.device)
        stop = start + len(chunk)
        after, scale = own_losses_after_newton(model, estimator, chunk, step, amp_dtype)
        out[start:stop] = (step.sign * scale * (after - base[start:stop]).double()).float()
        progress(stop / total)
    return out


def newton_self_products(model: ModelAdapter, estimator: IHVPEstimator, train: TrainingSet, *, rows: int,
                         progress: Callable[[float], None]) -> Tensor:
    """`[N]` float64 gᵢᵀ(G + λI)⁻¹gᵢ, gᵢ = ∇L(θ̂, zᵢ), solved `rows` rows at a time in float64
    (a memorised row's value lies far below float32's range)."""
    total = len(train)
    out = torch.empty(total, dtype=torch.float64)
    for start, batch in train.batches(rows):
        grads = model.per_sample_grads(batch, chunk_size=rows).double()
        stop = start + len(batch)
        out[start:stop] = (estimator.solve(grads) * grads).sum(1).cpu()
        progress(stop / total)
    return out
