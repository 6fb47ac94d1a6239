"""Influence functions (Koh & Liang 2017) with Gauss-Newton / Fisher / Hessian curvature
and pluggable iHVP estimators.

    score(z_i, q) = ∇_θ L(q, θ̂)ᵀ (G + λI)⁻¹ ∇_θ ℓ(z_i, θ̂)

is minus the classic upweighting influence `I_up,loss(z_i, q)`, i.e. ≈ N × the rise of the
query loss when row i is removed (positive = the row supports the query's prediction).
`L(q, ·)` is the query set's mean loss (`joint`, one row) or each query's loss
(`per_sample`, Q rows). The inverse is applied to the few query gradients only; the
training rows are then streamed once (`ModelAdapter.iter_per_sample_grads`) for dot
products. Self-influence is `g_iᵀ (G + λI)⁻¹ g_i`, solved block by block.

The estimator's fitted state (eigendecomposition, Kronecker factors, low-rank basis, step
size) is cached under its fit arguments (`IHVPFit`); damping is
applied at solve time, so neither a second query nor another damping refits. `damping=None`
uses `λ = 0.01 · tr(G)/P` (1% of the mean curvature eigenvalue; the trace is cached too;
EK-FAC reads it off its fitted eigenvalues, `Σ_l Σ Λ*_l = Σ_l tr(G_ll) = tr(G)`, saving a pass).
Measured with the exact inverse on digits (1,200 rows) at relative factors 1e-4 … 1: mislabel
AUC of self-influence (20% flipped) is flat (LR 0.993–0.995, MLP 64-32-10 0.960–0.964);
raw top-1 leakage retrieval falls as damping grows (LR 7/20 → 2/20, MLP 14/20 → 3/20; 5 and
11 at 0.01) while the relative form stays at 20/20 throughout; for the L2-regularised LR the
training objective's own damping is 0.25 × the mean eigenvalue. 0.01 keeps most of the
small-damping benefit while bounding the condition number that CG/LiSSA must handle.

`ihvp="auto"` (default) picks `exact` when P ≤ `exact_max_params` (no approximation, the
dense eigendecomposition makes self-influence cheap), else `ekfac` when every tracked
parameter sits in a layer K-FAC factors (eager Linear/Conv2d; TorchScript linear layers with
a bias — `attribution.ihvp.kfac.unsupported_parameters`), else `cg` (any model, converges
to the exact damped inverse). If the EK-FAC fit then meets a layer that breaks a K-FAC
assumption only visible at run time (`KroneckerStructureError`: a layer called twice or
never, a TorchScript layer seeing several positions per row), `auto` falls back to `cg` and
says why in `extras["ihvp_fallback"]`; an explicit `ihvp: ekfac` fails with that error.

Language models (`causal_lm`) above `exact_max_params` with no `layers`: `auto` (and an
explicit `kfac`/`ekfac`) tracks the linear layers of the transformer blocks — `nn.Linear`
and GPT-2's `Conv1D` — and solves with `ekfac`; embeddings, normalisation layers and the
output layer (tied to the input embedding or not) are left out
(`attribution.ihvp.kronecker_scope`). CG over every parameter of an LM needs a hundred
Gauss-Newton products per query — impractical — while EK-FAC fits in two passes over the
rows and solves in closed form. `extras` report the tracked layers (`ihvp_layers`) and the
untracked parameters by reason (`ihvp_untracked`); give `layers` to choose others.

`curvature`: "gauss_newton" (default, positive semi-definite), "fisher" (empirical), or
"hessian": Koh & Liang's actual Hessian H of the mean training loss, which keeps the
second-derivative-of-the-network term the Gauss-Newton matrix drops (they coincide for models
linear in θ, e.g. logistic regression). H is indefinite away from a minimum, so it works with
the exact, cg and arnoldi estimators only (`auto` → exact, else cg); kfac/ekfac (Gauss-Newton
factors) and lissa (its convergence checks assume a positive semi-definite curvature) are
rejected as `params.curvature` errors, and a damped `H + λI` that is not positive definite
fails the fit with a `ValueError` saying to raise `damping` or use gauss_newton. Its default
damping uses `tr(H)`, exact up to 2,048 parameters, else a seeded Hutchinson estimate
(`attribution.curvature`); a trace ≤ 0 asks for an explicit damping.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import torch
from pydantic import StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.artifacts import FitArgs, cached_tensors
from attribution.curvature import CurvatureName, CurvatureOperator
from attribution.data import Batch, TrainingSet
from attribution.ihvp import EKFACIHVP, IHVPEstimator, IHVPName, build_estimator
from attribution.ihvp.exact import DEFAULT_MAX_PARAMS
from attribution.ihvp.kfac import kronecker_layers
from attribution.ihvp.kfac_scripted import KroneckerStructureError
from attribution.ihvp.kronecker_scope import KroneckerScope, language_model_scope
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    ParamsError,
    Progress,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter
from attribution.tasks import TaskName

DEFAULT_RELATIVE_DAMPING = 0.01


class IHVPChoice(StrEnum):
    AUTO = "auto"
    EXACT = "exact"
    CG = "cg"
    LISSA = "lissa"
    ARNOLDI = "arnoldi"
    KFAC = "kfac"
    EKFAC = "ekfac"


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class IHVPParams(MethodParams):
    """The iHVP estimator's arguments, shared by every method that solves with `(G + λI)⁻¹`
    (influence functions, Integrated Influence, Forward-INF's Newton-step unlearning).
    `damping` unset: `λ = relative_damping · tr(G)/P` (`relative_damping` times the mean
    curvature eigenvalue; module docstring)."""

    ihvp: IHVPChoice = IHVPChoice.AUTO
    curvature: CurvatureName = CurvatureName.GAUSS_NEWTON
    damping: StrictFloat | None = None
    relative_damping: StrictFloat = DEFAULT_RELATIVE_DAMPING
    cg_max_iter: StrictInt = 100
    cg_tol: StrictFloat = 1e-5
    lissa_depth: StrictInt = 1000
    lissa_scale: StrictFloat | None = None
    lissa_repeats: StrictInt = 1
    arnoldi_rank: StrictInt | None = None  # None: Krylov dimension adapted to the damping (ihvp/arnoldi.py)
    arnoldi_iterations: StrictInt | None = None
    exact_max_params: StrictInt = DEFAULT_MAX_PARAMS
    fit_batch_size: StrictInt = 512
    fit_rows: StrictInt | None = None

    def check(self) -> None:
        _positive("damping", self.damping)
        _positive("relative_damping", self.relative_damping)
        _positive("cg_tol", self.cg_tol)
        _positive("lissa_scale", self.lissa_scale)
        for name in ("cg_max_iter", "lissa_depth", "lissa_repeats", "arnoldi_rank", "arnoldi_iterations",
                     "exact_max_params", "fit_batch_size", "fit_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ParamsError(name, "must be at least 1")
        if self.arnoldi_rank is not None and self.arnoldi_iterations is not None \
                and self.arnoldi_iterations < self.arnoldi_rank:
            raise ParamsError("arnoldi_iterations", "must be at least arnoldi_rank")
        if CurvatureName(self.curvature) is CurvatureName.HESSIAN:
            ihvp = IHVPChoice(self.ihvp)
            if ihvp in (IHVPChoice.KFAC, IHVPChoice.EKFAC):
                raise ParamsError("curvature", f"hessian does not work with ihvp {ihvp.value}: K-FAC/EK-FAC factor "
                                               "the Gauss-Newton curvature, and the indefinite Hessian has no such "
                                               "factors — use ihvp exact, cg, arnoldi or auto")
            if ihvp is IHVPChoice.LISSA:
                raise ParamsError("curvature", "hessian does not work with ihvp lissa: its convergence and divergence "
                                               "checks assume a positive semi-definite curvature — use ihvp exact, "
                                               "cg, arnoldi or auto")


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class InfluenceParams(IHVPParams):
    """Influence-function arguments; `layers` restricts the tracked parameters (prefixes).
    `normalize` defaults to "relative" (RelatIF; benchmarks/results/q3_leakage.md, fair protocol)."""

    normalize: Normalize = Normalize.RELATIVE

    layers: tuple[StrictStr, ...] = ()

    def check(self) -> None:
        super().check()
        if any(not isinstance(layer, str) or not layer for layer in self.layers):
            raise ParamsError("layers", "must be non-empty parameter-name prefixes")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ParamsError(name, "must be positive")


# --------------------------------------------------------------------------- fitting
def kronecker_scope(model: ModelAdapter, params: IHVPParams) -> KroneckerScope | None:
    """The language-model layer scope a Kronecker-factored estimator uses by default, or None
    when it does not apply: a `causal_lm` eager model, no `layers`, Gauss-Newton or Fisher
    curvature, `ihvp` kfac/ekfac, or auto with more than `exact_max_params` parameters
    (module docstring)."""
    if getattr(params, "layers", ()) or model.task.name is not TaskName.CAUSAL_LM or model.is_scripted:
        return None
    if CurvatureName(params.curvature) is CurvatureName.HESSIAN:
        return None
    choice = IHVPChoice(params.ihvp)
    if choice is IHVPChoice.AUTO and model.num_params <= params.exact_max_params:
        return None
    if choice not in (IHVPChoice.AUTO, IHVPChoice.KFAC, IHVPChoice.EKFAC):
        return None
    scope = language_model_scope(model.module)
    return scope if scope.layers else None


def tracked_model(model: ModelAdapter, params: InfluenceParams,
                  extras: dict[str, Any] | None = None) -> tuple[ModelAdapter, bool]:
    """The model with `params.layers` as its tracked parameters (the same module); with no
    `layers`, a language model's `kronecker_scope` when it applies (reported in `extras`).
    Also whether that scope was applied (pass it on to `fitted_estimator` as `scoped`)."""
    if params.layers:
        return ModelAdapter(model.module, model.task, device=model.device, layers=params.layers), False
    scope = kronecker_scope(model, params)
    if scope is None:
        return model, False
    if extras is not None:
        extras.update(ihvp_layers=list(scope.layers), ihvp_untracked=scope.summary())
    return ModelAdapter(model.module, model.task, device=model.device, layers=scope.layers), True


def resolve_ihvp(model: ModelAdapter, params: IHVPParams, *, scoped: bool = False) -> IHVPName:
    """The estimator `params.ihvp` names; `auto` → exact, else ekfac if supported (never for
    the Hessian curvature), else cg. `scoped` (the tracked layers are a language model's
    `kronecker_scope`): auto → ekfac whatever the scope's size."""
    choice = IHVPChoice(params.ihvp)
    if choice is not IHVPChoice.AUTO:
        return IHVPName(choice.value)
    if model.num_params <= params.exact_max_params and not scoped:
        return IHVPName.EXACT
    if CurvatureName(params.curvature) is CurvatureName.HESSIAN:
        return IHVPName.CG
    try:
        kronecker_layers(model)
    except ValueError:
        return IHVPName.CG
    return IHVPName.EKFAC


class IHVPFit(FitArgs):
    """Everything an estimator's fitted state depends on besides model and data: the estimator,
    the curvature, the tracked parameter names, the fit rows and batch, the seed (sampled
    curvature factors beyond MAX_FACTOR_OUTPUTS outputs per row); Arnoldi's rank and Krylov
    dimension, LiSSA's automatic scale (None for the other estimators)."""

    kind = "ihvp"
    ihvp: str
    curvature: str
    params: list[str]
    fit_rows: int | None
    fit_batch_size: int
    seed: int
    rank: int | None = None
    iterations: int | None = None
    auto_scale: bool | None = None

    @classmethod
    def of(cls, params: IHVPParams, ihvp: IHVPName, names: Sequence[str]) -> IHVPFit:
        """The fit arguments of `params` with the resolved estimator `ihvp` over the parameters `names`."""
        arnoldi, lissa = ihvp is IHVPName.ARNOLDI, ihvp is IHVPName.LISSA
        return cls(ihvp=ihvp.value, curvature=CurvatureName(params.curvature).value, params=list(names),
                   fit_rows=params.fit_rows, fit_batch_size=params.fit_batch_size, seed=params.seed,
                   rank=params.arnoldi_rank if arnoldi else None, iterations=params.arnoldi_iterations if arnoldi else None,
                   auto_scale=params.lissa_scale is None if lissa else None)


class CurvatureTrace(FitArgs):
    """The fit of tr(C) (the default damping's scale): curvature, tracked parameters, fit rows, seed."""

    kind = "curvature-trace"
    curvature: str
    params: list[str]
    fit_rows: int | None
    seed: int

    @classmethod
    def of(cls, params: IHVPParams, names: Sequence[str]) -> CurvatureTrace:
        return cls(curvature=CurvatureName(params.curvature).value, params=list(names), fit_rows=params.fit_rows,
                   seed=params.seed)


def fitted_estimator(model: ModelAdapter, params: IHVPParams, context: FitContext,
                     train: TrainingSet, *, cache: bool = True, scoped: bool = False) -> IHVPEstimator:
    """Build the estimator and load its state from the store (fitting once on a miss).

    Records `ihvp_fit` in `context.timings` and the resolved estimator, damping and
    whether the fit was served from the store in `context.extras`. `scoped`: see `resolve_ihvp`.
    """
    started = time.perf_counter()
    ihvp = resolve_ihvp(model, params, scoped=scoped)
    curvature = CurvatureOperator(model, CurvatureName(params.curvature), batch_size=params.fit_batch_size,
                                  max_rows=params.fit_rows, seed=params.seed)
    # EK-FAC's default damping reads tr(G) off its fitted eigenvalues (no pass of its own)
    from_state = params.damping is None and ihvp is IHVPName.EKFAC
    damping = params.damping
    if damping is None and not from_state:
        damping = _relative_damping(curvature, params, context, train, cache=cache)
    try:
        estimator, computed = _loaded_estimator(ihvp, curvature, damping or 1.0, model, params, context, train,
                                                cache=cache)
    except KroneckerStructureError as exc:
        if IHVPChoice(params.ihvp) is not IHVPChoice.AUTO:
            raise
        context.extras["ihvp_fallback"] = f"{ihvp.value}: {exc}"[:500]
        ihvp = IHVPName.CG  # auto: a layer broke a K-FAC assumption only visible while fitting
        if damping is None:
            damping = _relative_damping(curvature, params, context, train, cache=cache)
        estimator, computed = _loaded_estimator(ihvp, curvature, damping, model, params, context, train, cache=cache)
    if damping is None:
        assert isinstance(estimator, EKFACIHVP)
        damping = _damping_from_trace(estimator.trace(), curvature, params.relative_damping)
        estimator.damping = damping
    context.timings["ihvp_fit"] = context.timings.get("ihvp_fit", 0.0) + time.perf_counter() - started
    context.extras.update(ihvp=ihvp.value, damping=damping, ihvp_fit_cached=not computed)
    return estimator


def _loaded_estimator(ihvp: IHVPName, curvature: CurvatureOperator, damping: float, model: ModelAdapter,
                      params: IHVPParams, context: FitContext, train: TrainingSet,
                      *, cache: bool) -> tuple[IHVPEstimator, bool]:
    """The estimator with its state loaded from the store or computed; whether it was computed."""
    estimator = build_estimator(
        ihvp, curvature, damping, exact_max_params=params.exact_max_params, cg_max_iter=params.cg_max_iter,
        cg_tol=params.cg_tol, lissa_depth=params.lissa_depth, lissa_scale=params.lissa_scale,
        lissa_repeats=params.lissa_repeats, arnoldi_rank=params.arnoldi_rank,
        arnoldi_iterations=params.arnoldi_iterations, seed=params.seed,
    )
    estimator.bind(train)
    computed = False

    def compute() -> dict[str, Tensor]:
        nonlocal computed
        computed = True
        return estimator.compute_state()

    store = context.store if cache else None
    estimator.load_state(cached_tensors(store, context.fingerprint, IHVPFit.of(params, ihvp, model.param_names), compute))
    return estimator, computed


def _relative_damping(curvature: CurvatureOperator, params: IHVPParams, context: FitContext,
                      train: TrainingSet, *, cache: bool) -> float:
    store = context.store if cache else None
    args = CurvatureTrace.of(params, curvature.model.param_names)
    trace = cached_tensors(store, context.fingerprint, args, lambda: {"trace": torch.tensor([curvature.trace(train)],
                                                                      dtype=torch.float64)})["trace"]
    return _damping_from_trace(float(trace[0]), curvature, params.relative_damping)


def _damping_from_trace(trace: float, curvature: CurvatureOperator, relative: float) -> float:
    """`λ = relative · tr(C)/P`; a `ValueError` unless it is positive."""
    damping = relative * trace / curvature.num_params
    if not damping > 0:
        raise ValueError(f"the default damping {relative:g}·tr(C)/P needs a positive trace, but the {curvature.kind.value} "
                         f"curvature's trace is {trace:.3g} here (a flat loss, or an indefinite Hessian away "
                         "from a minimum); give an explicit damping")
    return damping


# --------------------------------------------------------------------------- scoring
def query_gradients(model: ModelAdapter, queries: Batch, *, per_sample: bool) -> Tensor:
    """`[Q, P]` per-query loss gradients, or `[1, P]` of the mean query loss."""
    if len(queries) == 0:
        raise ValueError("no query samples")
    if per_sample:
        return model.per_sample_grads(queries)
    return model.grad(queries)[None]


def stream_scores(model: ModelAdapter, solved: Tensor, train: TrainingSet, batch_size: int,
                  progress: Progress) -> Tensor:
    """`[Q, N]` dot products `solvedᵀ ∇ℓ(z_i)` over the training rows, in one gradient sweep."""
    scores = torch.empty(solved.shape[0], len(train), dtype=torch.float32)
    total = max(len(train), 1)
    for start, grads in model.iter_per_sample_grads(train, batch_size):
        scores[:, start: start + grads.shape[0]] = (solved @ grads.to(solved.dtype).T).float().cpu()
        progress((start + grads.shape[0]) / total)
    return scores


def self_influences(model: ModelAdapter, estimator: IHVPEstimator, train: TrainingSet, batch_size: int,
                    progress: Progress) -> Tensor:
    """`[N]` values `g_iᵀ (G + λI)⁻¹ g_i`, one batched solve per block of rows."""
    out = torch.empty(len(train), dtype=torch.float32)
    total = max(len(train), 1)
    for start, grads in model.iter_per_sample_grads(train, batch_size):
        out[start: start + grads.shape[0]] = (estimator.solve(grads) * grads).sum(1).float().cpu()
        progress((start + grads.shape[0]) / total)
    return out


@register
class InfluenceFunction(AttributionMethod):
    """`score_i = ∇L_qᵀ (G + λI)⁻¹ ∇ℓ_i`; see the module docstring."""

    name = MethodName.INFLUENCE
    params_type = InfluenceParams
    params: InfluenceParams

    @classmethod
    def fits_curvature(cls, params: MethodParams) -> bool:
        return True

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        self.tracked, self.scoped = tracked_model(model, self.params, context.extras)
        self._estimator: IHVPEstimator | None = None

    def fit(self, train: TrainingSet) -> None:
        self.estimator(train)

    def estimator(self, train: TrainingSet) -> IHVPEstimator:
        """The fitted estimator (fitted, or loaded from the store, on first use)."""
        if self._estimator is None:
            self._estimator = fitted_estimator(self.tracked, self.params, self.context, train, scoped=self.scoped)
        return self._estimator

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        estimator = self.estimator(train)
        started = time.perf_counter()
        solved = estimator.solve(query_gradients(self.tracked, queries, per_sample=per_sample))
        self.context.timings["ihvp_solve"] = time.perf_counter() - started
        started = time.perf_counter()
        scores = stream_scores(self.tracked, solved, train, self.params.batch_size, self.context.progress)
        self.context.timings["score_sweep"] = time.perf_counter() - started
        return scores

    def self_influence(self, train: TrainingSet) -> Tensor:
        estimator = self.estimator(train)
        return self_influences(self.tracked, estimator, train, self.params.batch_size, self.context.progress)
