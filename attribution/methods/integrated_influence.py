"""Integrated Influence (Yang, Gu & Sun 2025, "Integrated Influence: Data Attribution with
Baseline"): influence accumulated along a path from a baseline dataset to the real one.

Derivation implemented here. Let `R(θ; y) = (1/N) Σ_i ℓ(f_i(θ), y_i)` and `θ̂(y)` its
minimiser. The targets move on the straight path `y(t) = y' + t (y − y')`, t ∈ [0, 1], from
baseline targets `y'` to the real labels `y`. By the implicit function theorem
`dθ̂/dt = −H⁻¹ (1/N) Σ_i ∂_t ∇_θ ℓ(f_i, y_i(t))`. For cross-entropy with soft targets
(`∇_θ ℓ = J_iᵀ(softmax(f_i) − y_i)`) and squared error (`∇_θ ℓ = 2 J_iᵀ(f_i − y_i)`) the
gradient is affine in the target, so row i's term is the constant output-space vector

    d_i = ∂ℓ/∂f(f_i, y_i) − ∂ℓ/∂f(f_i, y'_i)   (CE: d_i = y'_i − e_{y_i};  MSE: d_i = 2(y'_i − y_i)),

mapped through `J_i(θ)ᵀ`. Splitting the change of the query loss between the rows and
flipping the sign to the project's convention (positive = supports the query), row i's
score is the path integral, taken as a right Riemann sum with K steps
`t_k = k/K` at parameters `θ_k`:

    score_i = (1/K) Σ_{k=1..K} ∇L_q(θ_k)ᵀ (G(θ_k) + λI)⁻¹ J_i(θ_k)ᵀ d_i.

Baselines `y'`:
- `unlearned` (default): predictions of `θ_u`, the model after `unlearn_steps` SGD steps
  (lr `unlearn_lr`) on `−L_q(θ) + reg · R(θ)` (gradient ascent on the query loss,
  regularised by the training loss, mini-batches cycled in row order). A model fitted to
  its own soft predictions is stationary (`Σ J_iᵀ(p_i − y'_i) = 0`), so `θ̂(y') ≈ θ_u` and
  the path parameters are `θ_k = θ_u + t_k (θ̂ − θ_u)`; each step refits the curvature at
  `θ_k` (only `θ_K = θ̂`'s fit is cached — the others depend on the query). The damping λ
  is the one resolved at θ̂ for every step: it regularises one objective along the whole
  path, and resolving it again would cost a curvature-trace pass per step.
  `per_sample=True` unlearns each query on its own (row q equals the joint score of query
  q alone); the joint mode unlearns the mean query loss once.
- `prediction`: the model's own predictions at θ̂ (softmax probabilities / outputs);
  then `θ̂(y') = θ̂`, the path stays at θ̂ and K does not matter.
- `uniform`: `1/C` per class (regression: the mean training target), evaluated at θ̂.

Lemma 2.5 (influence functions as the special case): with the prediction baseline and
K = 1, `d_i = p_i − e_{y_i} = ∂ℓ/∂f`, so `J_iᵀ d_i = ∇_θ ℓ_i` and the score is exactly
`∇L_qᵀ (G + λI)⁻¹ ∇ℓ_i`, the influence-function score.

Linear regression (`f = x̃ᵀθ`, squared error; the closed form the tests check): `G = (2/N) X̃ᵀX̃`
is constant, `θ̂(y')` is exactly `θ_u`, and `∇L_q(θ_k) = 2 x̃_q r_q(θ_k)` is affine in `t`,
so the K-step sum is `score_i = 2 r_q(θ_t̄) · x̃_qᵀ (G + λI)⁻¹ x̃_i · 2 (x̃_iᵀθ_u − y_i)` with
`t̄ = (K+1)/(2K)`. Writing `x̃_iᵀθ_u − y_i = e_i + x̃_iᵀ(θ_u − θ̂)` (`e_i` the residual at θ̂)
shows IIF = (a positive per-query rescaling of) IF plus a term driven by the unlearning step:
the unlearning strength alone sets how far IIF departs from IF.

Compression: `rank > 0` projects onto the top-`rank` eigenspace of the curvature (Fisher /
Gauss-Newton low-rank compression, computed with the Arnoldi estimator; with the Hessian the
top-`rank` eigenvalues by magnitude). Supported tasks: classification, regression and causal
LMs (next-token cross-entropy: a soft target per position; the targets enter the loss
gradient linearly in all three).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from enum import StrEnum
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import StrictFloat, StrictInt
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.curvature import curvature_batches, flat_outputs, per_sample_output_vjp
from attribution.data import Batch, TrainingSet
from attribution.ihvp import IHVPEstimator
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    ParamsError,
    Progress,
    stage_progress,
)
from attribution.methods.influence import (
    IHVPChoice,
    InfluenceParams,
    fitted_estimator,
    query_gradients,
    tracked_model,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter
from attribution.tasks import TaskName

_VJP_CHUNK = 64


class Baseline(StrEnum):
    UNLEARNED = "unlearned"
    PREDICTION = "prediction"
    UNIFORM = "uniform"


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class IntegratedInfluenceParams(InfluenceParams):
    """Influence arguments plus the path: `steps` K, `baseline`, unlearning and compression.
    `normalize` stays "none" by default (not measured under the fair protocol: too costly per query)."""

    normalize: Normalize = Normalize.NONE

    steps: StrictInt = 5
    baseline: Baseline = Baseline.UNLEARNED
    unlearn_steps: StrictInt = 5
    unlearn_lr: StrictFloat = 0.01
    reg: StrictFloat = 1.0
    rank: StrictInt = 0

    def check(self) -> None:
        super().check()
        try:
            Baseline(self.baseline)
        except ValueError:
            raise ParamsError("baseline", f"must be one of {', '.join(b.value for b in Baseline)}") from None
        for name in ("steps", "unlearn_steps"):
            if getattr(self, name) < 1:
                raise ParamsError(name, "must be at least 1")
        if not self.unlearn_lr > 0:
            raise ParamsError("unlearn_lr", "must be positive")
        if self.reg < 0:
            raise ParamsError("reg", "must be non-negative")
        if self.rank < 0:
            raise ParamsError("rank", "must be non-negative (0: no compression)")
        if self.rank > 0 and IHVPChoice(self.ihvp) not in (IHVPChoice.AUTO, IHVPChoice.ARNOLDI):
            raise ParamsError("rank", "low-rank compression uses the arnoldi estimator; set ihvp to auto or arnoldi")

    def estimator_params(self) -> IntegratedInfluenceParams:
        """The params the iHVP is fitted with (`rank > 0` → Arnoldi with that rank)."""
        if self.rank == 0:
            return self
        return dataclasses.replace(self, ihvp=IHVPChoice.ARNOLDI, arnoldi_rank=self.rank,
                                   arnoldi_iterations=max(self.arnoldi_iterations or 2 * self.rank, self.rank))


# --------------------------------------------------------------------------- targets
def target_delta(model: ModelAdapter, outputs: Tensor, targets: Tensor, baseline: Tensor) -> Tensor:
    """`[B, K]` `d_i = ∂ℓ/∂f(y_i) − ∂ℓ/∂f(y'_i)` for soft baseline targets `[B, K]`.

    Causal LMs (`K = T·V`, the loss the mean cross-entropy over the counted positions C):
    position t predicts token t+1, so `d_{i,t} = (y'_{i,t} − e_{x_{t+1}}) / |C_i|` where t+1 is
    counted and 0 elsewhere (padding, prompt tokens, the last position).
    """
    if model.task.name is TaskName.CLASSIFICATION:
        return baseline - F.one_hot(targets.long().reshape(-1), outputs.shape[1]).to(baseline.dtype)
    if model.task.name is TaskName.REGRESSION:
        return 2.0 * (baseline - targets.reshape(targets.shape[0], -1).to(baseline.dtype))
    if model.task.name is TaskName.CAUSAL_LM:
        rows, length = targets.shape
        soft = baseline.reshape(rows, length, -1)
        following = torch.full_like(targets, -100)
        following[:, :-1] = targets[:, 1:]  # the token position t predicts
        counted = following != -100
        hard = F.one_hot(following.clamp(min=0).long(), soft.shape[-1]).to(soft.dtype)
        weight = counted.to(soft.dtype) / counted.sum(dim=1, keepdim=True).clamp(min=1).to(soft.dtype)
        return ((soft - hard) * weight.unsqueeze(-1)).reshape(rows, -1)
    raise ValueError(f"integrated influence does not support the {model.task.name} task")


def predictions(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, K]` soft targets a model predicts: class probabilities (per position for causal LMs,
    flattened to `K = T·V`) or regression outputs."""
    with torch.no_grad():
        outputs = flat_outputs(model, batch)
    outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    if model.task.name is TaskName.CAUSAL_LM:
        rows = outputs.shape[0]
        return outputs.reshape(rows, batch.targets.shape[1], -1).softmax(dim=-1).reshape(rows, -1)
    return outputs.softmax(dim=1) if model.task.name is TaskName.CLASSIFICATION else outputs


def uniform_targets(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, K]` the uniform distribution over classes (over the vocabulary at each position)."""
    soft = predictions(model, batch)
    classes = soft.shape[1] // batch.targets.shape[1] if model.task.name is TaskName.CAUSAL_LM else soft.shape[1]
    return torch.full_like(soft, 1.0 / classes)


def cycled_batches(train: TrainingSet, batch_size: int, max_rows: int | None) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in curvature_batches(train, batch_size, max_rows):
            empty = False
            yield batch
        if empty:
            raise ValueError("the training set is empty")


def unlearn(model: ModelAdapter, queries: Batch, train: TrainingSet, params: IntegratedInfluenceParams) -> ModelAdapter:
    """θ_u: SGD on `−L_q(θ) + reg · R(θ)` from θ̂ (a clone; θ̂ is untouched)."""
    clone = model.clone()
    optimizer = torch.optim.SGD(clone.live_params(), lr=params.unlearn_lr)
    batches = cycled_batches(train, params.fit_batch_size, params.fit_rows)
    with torch.enable_grad():
        for _ in range(params.unlearn_steps):
            objective = -clone.loss(queries).mean() + params.reg * clone.loss(next(batches)).mean()
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
    clone.module.eval()
    return clone


def at_params(model: ModelAdapter, flat: Tensor) -> ModelAdapter:
    """A clone of `model` with tracked parameters `flat` `[P]`."""
    clone = model.clone()
    clone.load_flat(flat)
    return clone


@register
class IntegratedInfluence(AttributionMethod):
    """Integrated Influence; see the module docstring for the estimator and its baselines."""

    name = MethodName.INTEGRATED_INFLUENCE
    params_type = IntegratedInfluenceParams
    params: IntegratedInfluenceParams

    @classmethod
    def fits_curvature(cls, params: MethodParams) -> bool:
        return True

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        self.tracked, self.scoped = tracked_model(model, self.params, context.extras)
        self._estimator: IHVPEstimator | None = None

    def fit(self, train: TrainingSet) -> None:
        self.final_estimator(train)

    def final_estimator(self, train: TrainingSet) -> IHVPEstimator:
        """The (cached) estimator at θ̂, shared with `InfluenceFunction` for equal arguments."""
        if self._estimator is None:
            self._estimator = fitted_estimator(self.tracked, self.params.estimator_params(), self.context, train,
                                               scoped=self.scoped)
        return self._estimator

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint) path-integrated scores.

        With the `unlearned` baseline the path depends on the query, so `per_sample` runs one
        path per query (each unlearns only its own query); the θ̂ estimator and its damping
        are fitted once and shared. The static baselines share one path at θ̂ for all queries.
        """
        if per_sample and len(queries) > 1 and Baseline(self.params.baseline) is Baseline.UNLEARNED:
            rows = [self._path_scores(queries.slice(q, q + 1), train, False,
                                      stage_progress(self.context.progress, q, len(queries)))
                    for q in range(len(queries))]
            return torch.cat(rows)
        return self._path_scores(queries, train, per_sample, self.context.progress)

    def self_influence(self, train: TrainingSet) -> Tensor:
        """`u_iᵀ (G + λI)⁻¹ u_i`, `u_i = J_iᵀ d_i` at θ̂; the query-free `prediction`
        baseline replaces `unlearned` (with no query there is nothing to unlearn), which
        makes it the influence-function self-influence."""
        estimator = self.final_estimator(train)
        baseline = self._static_baseline(train)
        out = torch.empty(len(train), dtype=torch.float32)
        for start, deltas in self._delta_gradients(self.tracked, baseline, train, self.context.progress):
            out[start: start + deltas.shape[0]] = (estimator.solve(deltas) * deltas).sum(1).float().cpu()
        return out

    # ----------------------------------------------------------------- internals
    def _path_scores(self, queries: Batch, train: TrainingSet, per_sample: bool, progress: Progress) -> Tensor:
        """`[Q or 1, N]`: `(1/K) Σ_k ∇L_q(θ_k)ᵀ (G(θ_k) + λI)⁻¹ J_i(θ_k)ᵀ d_i` over one path."""
        path = self._path(queries, train)
        final = self.final_estimator(train)
        scores = torch.zeros(len(queries) if per_sample else 1, len(train), dtype=torch.float32)
        for k, (model_at_k, baseline) in enumerate(path):
            model = model_at_k()
            estimator = final if model is self.tracked else self._path_estimator(model, train, final.damping)
            solved = estimator.solve(query_gradients(model, queries, per_sample=per_sample))
            for start, deltas in self._delta_gradients(model, baseline, train, stage_progress(progress, k, len(path))):
                scores[:, start: start + deltas.shape[0]] += (solved @ deltas.to(solved.dtype).T).float().cpu() / len(path)
        return scores

    def _path_estimator(self, model: ModelAdapter, train: TrainingSet, damping: float) -> IHVPEstimator:
        """A fresh (uncached: θ_k depends on the query) fit at θ_k with θ̂'s damping λ."""
        params = dataclasses.replace(self.params.estimator_params(), damping=damping)
        return fitted_estimator(model, params, self.context, train, cache=False, scoped=self.scoped)

    def _path(self, queries: Batch, train: TrainingSet) -> list[tuple[Callable[[], ModelAdapter], Callable[[Batch], Tensor]]]:
        """`(model at θ_k, built when called, baseline targets of a batch)` for k = 1..K (one entry
        when θ stays at θ̂); one θ_k copy is alive at a time, whatever K."""
        if Baseline(self.params.baseline) is not Baseline.UNLEARNED:
            return [(lambda: self.tracked, self._static_baseline(train))]
        started = time.perf_counter()
        unlearned = unlearn(self.tracked, queries, train, self.params)
        self.context.timings["unlearn_s"] = self.context.timings.get("unlearn_s", 0.0) + time.perf_counter() - started
        start, end = unlearned.flat_params(), self.tracked.flat_params()
        steps = self.params.steps

        def at_step(k: int) -> ModelAdapter:
            return at_params(self.tracked, start + (k / steps) * (end - start))

        models: list[Callable[[], ModelAdapter]] = [partial(at_step, k) for k in range(1, steps)]
        models.append(lambda: self.tracked)

        def unlearned_targets(batch: Batch) -> Tensor:
            return predictions(unlearned, batch)

        return [(model, unlearned_targets) for model in models]

    def _static_baseline(self, train: TrainingSet) -> Callable[[Batch], Tensor]:
        if Baseline(self.params.baseline) is not Baseline.UNIFORM:
            return lambda batch: predictions(self.tracked, batch)
        if self.tracked.task.name in (TaskName.CLASSIFICATION, TaskName.CAUSAL_LM):
            return lambda batch: uniform_targets(self.tracked, batch)
        mean = _mean_target(train)
        return lambda batch: mean.to(self.tracked.device).expand(len(batch), -1)

    def _delta_gradients(self, model: ModelAdapter, baseline: Callable[[Batch], Tensor], train: TrainingSet,
                         progress: Progress) -> Iterator[tuple[int, Tensor]]:
        """`(start, [b, P])` rows `J_i(θ)ᵀ d_i` over the training set, reporting progress."""
        total = max(len(train), 1)
        for start, batch in train.batches(self.params.batch_size):
            parts = []
            for offset in range(0, len(batch), _VJP_CHUNK):
                chunk = batch.slice(offset, offset + _VJP_CHUNK).to(model.device)
                soft = baseline(chunk)
                with torch.enable_grad():
                    outputs = flat_outputs(model, chunk)
                    deltas = target_delta(model, outputs, chunk.targets, soft)
                    parts.append(per_sample_output_vjp(model, outputs, deltas))
            yield start, torch.cat(parts)
            progress((start + len(batch)) / total)


def _mean_target(train: TrainingSet) -> Tensor:
    total: Tensor | None = None
    rows = 0
    for _, batch in train.batches(4096):
        flat = batch.targets.reshape(len(batch), -1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        rows += len(batch)
    if total is None:
        raise ValueError("the training set is empty")
    return (total / rows).float()[None]
