"""Forward-INF: test→train influence by unlearning the query (the mirrored influence hypothesis).

Algorithm 1 of the Forward-INF paper: copy the trained parameters θ̂, take K gradient
**ascent** steps with learning rate α on the query samples' mean loss,

    θ_{k+1} = θ_k + α ∇_θ (1/Q) Σ_q L(θ_k, z_q),        θ_0 = θ̂,

then one forward pass per training row:

    score_i = L(θ_K, z_i) − L(θ̂, z_i)                                   [N]

Higher = the row supports the query's prediction (the product's sign convention); with
`direction="descent"` the sign is flipped so the convention holds both ways. `optimizer`
"sgd" is exactly Algorithm 1 (the default: `{"steps": 5, "lr": 0.01}` is the paper's run);
"normalized_sgd" steps θ_{k+1} = θ_k + α g_k/‖g_k‖₂ (same direction, step length α);
"adam" is torch's Adam. `L(θ̂, ·)` is computed once per (model, data) and cached, so a
query costs one sweep; `per_sample` unlearns each query separately and scores all Q in one
pass (`forward_inf_unlearning`, `forward_inf_sweep`).

Language models: `stop="forgotten"` (`forward_inf_stopping`) makes K a cap, each query's
ascent stopping once its loss reaches the loss of its answer after a shuffled context
(label-free). Causal LMs get K = 20 normalised steps of α = 0.05 in the token embeddings only
(`scope="embeddings"`, `forward_inf_scope`) and relative scores by default
(`ForwardInfParams.for_task`, `CAUSAL_LM_DEFAULTS`: chosen on Q8's validation facts, where
ascending past the forgotten level traced facts better than stopping there, and ascent over
every parameter also forgot the query's wording, shared with other facts' sentences).

Newton-step unlearning (`unlearning="newton"`, `forward_inf_newton`): one step
θ' = θ̂ ± α(G + λI)⁻¹∇L_q with the influence method's cached iHVP, then the same sweep;
score_i ≈ α∇L_iᵀ(G + λI)⁻¹∇L_q, the influence function (Koh & Liang 2017) — where
Algorithm 1's first-order term α∇L_iᵀ∇L_q has no inverse curvature and tracks the gradient
dot product instead. Unset α = Q/N (the removal scale), reached by a finite-difference step
of length 10⁻³‖θ̂‖, so scores estimate the exact test→train influence
L(θ̂, z_i) − L(θ₊q, z_i) in its own units (Q2, N = 1,200, exact iHVP at the objective's
λ: Pearson 0.997 LR / 0.903 MLP, the influence function's own figures, vs 0.36 / 0.30 for
Algorithm 1 tuned on validation queries).

Memorised queries. A model that memorised its training rows has L_q ≈ e^{−m_q} (margin
m_q > 17 ⇒ L_q < 1e-7) and g_q = ∇L_q ≈ −L_q ∇m_q, ‖g_q‖ down to ~1e-17: an SGD step αg_q
leaves θ unchanged in float arithmetic and ΔL_i ≈ α g_iᵀg_q ~ 1e-36 sinks under the
rounding of L_i. A normalised step moves θ by exactly α, so ΔL_i ≈ α⟨g_i, ĝ_q⟩ and, for a
memorised row, ΔL_i / L_i ≈ −α⟨∇m_i, ĝ_q⟩ = O(α‖∇m_i‖), far above float32 rounding —
while the per-query ranking is SGD's (a positive factor 1/‖g_q‖).

Relative scores (RelatIF). To first order, one step with step map s changes row i's loss
by score_i ≈ ⟨g_i, s(g_q)⟩, g_i = ∇L(θ̂, z_i). Dividing by D_i = max over the step map's
unit ball of ⟨g_i, ·⟩ bounds score_i / D_i by a factor of q alone, reached by an exact
copy (g_i = g_q):

    sgd             s = α g_q          D_i = √α ‖g_i‖₂   score/D_i = √α ‖g_q‖₂ cos(g_i, g_q)
    normalized_sgd  s = α g_q/‖g_q‖₂   D_i = α ‖g_i‖₂    score/D_i = cos(g_i, g_q) ≤ 1
    adam (1st step) s ≈ α sign(g_q)    D_i = α ‖g_i‖₁    score/D_i = ⟨g_i, sign g_q⟩/‖g_i‖₁ ≤ 1

(Cauchy–Schwarz; Hölder for Adam, whose ‖·‖_∞ ball is not strictly convex: every row with
the copy's sign pattern ties, and the step is not sign-like where |g| ≲ Adam's ε = 1e-8).
`relative_norm_squared` returns D_i² from exact per-sample gradient norms (one backward
per row, computed once and cached as an `[N]` vector), not from a row's own loss change
after unlearning it: that is a difference of rounded losses (~L_i, noise for memorised
rows) and, for normalised or Adam steps, of degree 1 in g_i, so dividing by its square
root leaves a factor sqrt(‖g_i‖) that breaks the bound. `self_influence` (the row's own
loss change, the mislabel audit) is unchanged. Division runs in float64; ε = tiny² with
tiny the loss dtype's smallest normal number (a smaller D_i cannot be resolved). Classifiers
are the exception (`forward_inf_logspace`): their relative scores take normalized-SGD steps
along the scale-weighted gradient direction and loss changes from log-losses in float64, so
memorised rows (fp32 loss and gradient exactly 0) keep their scores; ε is then float64's tiny.

Defaults, chosen by measurement: K = 1 step in the first-order regime for every optimizer
(sgd α = 0.01, normalized_sgd 1e-3, adam 1e-4), raw and relative; relative scores by default.
Newton-step unlearning is more accurate but fits the curvature over the whole training set
and solves an iHVP per query, against Forward-INF's premise of forward passes only. The
evidence lives in the reports, not here: benchmarks/results/q2_forward_inf_target.md
(Pearson with exact test→train influence), q3_leakage.md (leaked copies ranked first),
q4_mislabel.md (self-influence AUC), q5_lds_linear.md / q6_lds_neural.md (LDS) and
q8_lm_tracing.md (causal LMs); `test_forward_inf.py` re-measures the leakage retrieval.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from attribution.artifacts import FitArgs, cached_tensors
from attribution.data import Batch, TensorTrainingSet, TrainingSet
from attribution.device import precision_tag
from attribution.ihvp import IHVPEstimator
from attribution.methods.base import (
    AttributionMethod,
    BatchedScores,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
)
from attribution.methods.checkpoints import check_checkpoint_context, checkpoint_sum
from attribution.methods.forward_inf_auto import AutoChoice, Candidate, select_hyperparameters
from attribution.methods.forward_inf_logspace import (
    LogLossTask,
    direction_model,
    log_loss_model,
    log_space_change,
    supports_log_space,
)
from attribution.methods.forward_inf_newton import (
    losses_at,
    moved_parameters,
    newton_directions,
    newton_self_influence,
    newton_self_products,
    parameter_copy,
)
from attribution.methods.forward_inf_params import (
    DEFAULTS,
    Direction,
    ForwardInfParams,
    Optimizer,
    Precision,
    SelfInfluenceMode,
    UnlearningRule,
    UnlearningScope,
)
from attribution.methods.forward_inf_scope import token_embedding_names
from attribution.methods.forward_inf_sweep import (
    BatchLosses,
    CastTrainingSet,
    cast_batch,
    copies_losses,
    sweep,
)
from attribution.methods.forward_inf_unlearning import (
    StackedModel,
    Unlearning,
    first_order_self_influence,
    gradient_norms,
    relative_denominator,
    unlearn_copy,
)
from attribution.methods.influence import fitted_estimator
from attribution.methods.registry import register
from attribution.model import ModelAdapter

STACK_BUDGET = 2**24  # stacked parameter elements per self-influence chunk when chunk_size = 0


class BaseLosses(FitArgs):
    """The fit of `L(θ̂, z_i)` `[N]`: the sweep's precision (`ForwardInf.precision`)."""

    kind = "train_losses"
    precision: str


class BaseLogLosses(BaseLosses):
    """The fit of `log L(θ̂, z_i)` `[N]` (classifiers' relative scores, `forward_inf_logspace`)."""

    kind = "train_log_losses"


class GradientNorms(FitArgs):
    """The fit of ‖∇L(θ̂, z_i)‖₂², ‖∇L(θ̂, z_i)‖₁ `[N]`: precision and the tracked parameter names."""

    kind = "gradient_norms"
    precision: str
    params: list[str]

__all__ = ["DEFAULTS", "Direction", "ForwardInf", "ForwardInfParams", "Optimizer", "Precision", "SelfInfluenceMode",
           "UnlearningRule"]


@register
class ForwardInf(AttributionMethod):
    """Forward-INF scores `[Q, N]` / `[1, N]`, self-influence `[N]` and the RelatIF
    denominators `[N]` (see module docstring).

    `self.params` holds the resolved setting (the task's defaults filled in, explicit
    optimizer/K/α: `ForwardInfParams.for_task`, `resolved`); with `auto`, `fit`
    replaces it by the chosen one (the pipeline reads the chosen `normalize` from it).
    """

    name = MethodName.FORWARD_INF
    params_type = ForwardInfParams
    row_separable = True  # with gradient unlearning the run sees only the query samples

    @classmethod
    def fits_curvature(cls, params: MethodParams) -> bool:
        """Newton-step unlearning fits (G + λI)⁻¹ over the whole training set."""
        return isinstance(params, ForwardInfParams) and params.newton

    @classmethod
    def can_fan_out(cls, params: MethodParams, task: str) -> bool:
        """As every method, and not `auto` (its search runs over the whole training set)."""
        return super().can_fan_out(params, task) and not (isinstance(params, ForwardInfParams) and params.auto)

    @classmethod
    def batch_key(cls, params: MethodParams) -> str | None:
        """Every param except `normalize` (relative and raw queries apart: relative scores of
        classifiers sweep log-losses); None for `auto` and Newton-step unlearning, whose
        unlearned copies are not Algorithm 1's K steps on the query alone."""
        if not isinstance(params, ForwardInfParams) or params.auto or params.newton:
            return None
        shared = {k: v for k, v in params.to_dict().items() if k != "normalize"}
        return repr((params.normalize == Normalize.RELATIVE, sorted(shared.items())))

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        if not isinstance(params, ForwardInfParams):
            raise TypeError("forward_inf takes ForwardInfParams")
        self.settings: ForwardInfParams = params.for_task(model.task.name).resolved()
        self.params = self.settings
        self.dtype = torch.float64 if params.precision == Precision.FP64 else None
        layers = list(self.settings.layers) or (token_embedding_names(model.module)
                                                if self.settings.scope == UnlearningScope.EMBEDDINGS else [])
        if self.dtype is None and not layers:  # the model as given: its tracked parameters
            self.tracked = model
        else:
            module = copy.deepcopy(model.module).double() if self.dtype is not None else model.module
            self.tracked = ModelAdapter(module, model.task, device=model.device, layers=layers or model.layers)
        self.base_losses: Tensor | None = None
        self.auto_choice: AutoChoice | None = None
        self._estimator: IHVPEstimator | None = None

    @property
    def precision(self) -> str:
        if self.dtype is not None:
            return "fp64"
        return precision_tag(self.model.device, self.context.amp_dtype)

    def _view(self, train: TrainingSet) -> TrainingSet:
        return CastTrainingSet(train, self.dtype) if self.dtype is not None else train

    def _cast(self, batch: Batch) -> Batch:
        batch = batch.to(self.model.device)
        return cast_batch(batch, self.dtype) if self.dtype is not None else batch

    def _sweep(self, evaluate: BatchLosses, train: TrainingSet, batch_size: int, report: bool) -> Tensor:
        return sweep(evaluate, self._view(train), batch_size=batch_size, device=self.model.device,
                     amp_dtype=self.context.amp_dtype, progress=self.context.progress if report else None)

    # ----------------------------------------------------------------- fit
    def fit(self, train: TrainingSet) -> None:
        """Cache `L(θ̂, z_i)` `[N]`; with `auto`, choose optimizer/K/α/normalize by self-retrieval."""
        started = time.perf_counter()
        def compute() -> dict[str, Tensor]:
            # A TorchScript module whose graph autograd has profiled (query gradients, curvature) refuses
            # inference tensors while its parameters require grad: sweep a frozen copy (see `unlearn_copy`).
            tracked = self.tracked
            model = parameter_copy(tracked, tracked.flat_params()) if tracked.is_scripted else tracked
            return {"losses": self._sweep(copies_losses([model]), train, self.settings.batch_size, False)[0]}

        cached = cached_tensors(self.context.store, self.context.fingerprint, BaseLosses(precision=self.precision),
                                compute)
        self.base_losses = cached["losses"]
        self.context.timings["base_losses_s"] = time.perf_counter() - started
        if self.settings.newton:
            self.estimator(train)
        if self.settings.auto:
            started = time.perf_counter()
            self.auto_choice = select_hyperparameters(
                self.settings, train, self.base_losses, self.context, self._candidate_scores,
                self._subset_gradient_norms, floor=self.relative_norm_floor(), precision=self.precision,
            )
            self.settings = replace(
                self.settings, optimizer=Optimizer(self.auto_choice.optimizer), steps=self.auto_choice.steps,
                lr=self.auto_choice.lr, normalize=Normalize(self.auto_choice.normalize),
            )
            self.params = self.settings
            self.context.extras["auto"] = self.auto_choice.to_dict()
            self.context.timings["auto_s"] = time.perf_counter() - started

    def estimator(self, train: TrainingSet) -> IHVPEstimator:
        """The Newton step's fitted `(G + λI)⁻¹` estimator: the influence method's fit, cached
        under its key (`influence.fitted_estimator`; fp64 copies under their own fingerprint)."""
        if self._estimator is None:
            context = self.context if self.dtype is None else replace(
                self.context, fingerprint=f"{self.context.fingerprint}:{self.precision}")
            self._estimator = fitted_estimator(self.tracked, self.settings, context, self._view(train))
        return self._estimator

    def _base(self, train: TrainingSet) -> Tensor:
        if self.base_losses is None:
            self.fit(train)
        base = self.base_losses
        if base is None or len(base) != len(train):
            raise ValueError(f"base losses do not cover the {len(train)} training rows")
        return base

    # ----------------------------------------------------------------- score
    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint): sign · (L(θ_K, z_i) − L(θ̂, z_i))."""
        if len(queries) == 0:
            raise ValueError("at least one query sample is required")
        base = self._base(train)
        return self._scores(self.settings, queries, train, base, per_sample=per_sample, report=True)

    def score_many(self, queries: Sequence[tuple[MethodParams, Batch]], train: TrainingSet) -> list[BatchedScores]:
        """`[1, N]` joint scores of B queries (each its params and samples z_b, all of one
        `batch_key`) from one sweep (Algorithm 1 per query):

            θ_K^(b) = K ascent steps from θ̂ on (1/|z_b|) Σ_{z ∈ z_b} L(θ, z)       b = 1..B
            score_b,i = sign · (L(θ_K^(b), z_i) − L(θ̂, z_i))                         [B, N]

        Each training batch is read once and all B unlearned copies are evaluated on it; each
        copy runs exactly the ops `score` runs, so each query's scores equal its one-query result.
        Each query's params get its model's task defaults (`for_task`), as alone.
        """
        settings = [p.for_task(self.model.task.name) for p, _ in queries if isinstance(p, ForwardInfParams)]
        keys = {self.batch_key(p) for p in settings}
        if len(settings) != len(queries) or len(keys) != 1 or None in keys:
            raise ValueError("score_many takes forward_inf params of one batch_key (no auto, no Newton step)")
        self._base(train)
        copies, results = [], []
        for p, (_, batch) in zip(settings, queries, strict=True):
            began = time.perf_counter()
            how = p.gradient_unlearning
            copies.append(self.unlearned_copy(p, batch, how))
            results.append(BatchedScores(torch.empty(0), timings={"unlearn_s": time.perf_counter() - began},
                                         extras={"unlearning_steps": how.log.steps_taken} if how.until_forgotten else {}))
        began = time.perf_counter()
        after = self._sweep(copies_losses(copies), train, settings[0].batch_size, True)  # [B, N]
        sweep_s = time.perf_counter() - began
        for b, (p, result) in enumerate(zip(settings, results, strict=True)):
            result.scores = self.loss_change(p, after[b:b + 1], train)
            result.timings["sweep_s"] = sweep_s
        return results

    def _scores(self, p: ForwardInfParams, queries: Batch, train: TrainingSet, base: Tensor,
                *, per_sample: bool, report: bool) -> Tensor:
        started = time.perf_counter()
        how = p.gradient_unlearning
        scale = None
        log_space = self._log_space(p)
        if p.newton:
            evaluate, scale = self._newton_unlearned(p, self._cast(queries), train, per_sample)
        else:
            evaluate = self._unlearned(how, self._cast(queries), per_sample, log_space=log_space)
        unlearned = time.perf_counter()
        after = self._sweep(evaluate, train, p.batch_size, report)
        if report:
            self.context.timings["unlearn_s"] = unlearned - started
            self.context.timings["sweep_s"] = time.perf_counter() - unlearned
            if how.log.zero_gradient_steps:
                self.context.extras["zero_gradient_steps"] = how.log.zero_gradient_steps
            if how.until_forgotten:  # steps each query (joint: the query set) took before it was forgotten
                self.context.extras["unlearning_steps"] = how.log.steps_taken
            else:
                self.context.extras.pop("unlearning_steps", None)
        if scale is not None:
            return (scale[:, None] * (p.sign * (after - base.unsqueeze(0))).double()).float()
        return self.loss_change(p, after, train)

    def loss_change(self, p: ForwardInfParams, after: Tensor, train: TrainingSet) -> Tensor:
        """`[Q, N]` sign · (L(θ_K, z_i) − L(θ̂, z_i)) from the sweep's `after` `[Q, N]`: float32, or
        float64 from log-losses under `_log_space(p)`, kept until the relative division."""
        if self._log_space(p):
            return p.sign * log_space_change(after, self._base_log_losses(train))
        return (p.sign * (after - self._base(train).unsqueeze(0))).float()

    def unlearned_copy(self, p: ForwardInfParams, queries: Batch, how: Unlearning | None = None) -> ModelAdapter:
        """θ_K after unlearning `queries` jointly (with `how`, default `p.gradient_unlearning`: pass
        your own run to read its log), evaluating what `loss_change(p, ...)` expects."""
        log_space = self._log_space(p)
        how = how or p.gradient_unlearning
        return self._sweepable(unlearn_copy(self._learner(how, log_space), self._cast(queries), how), log_space)

    def _log_space(self, p: ForwardInfParams) -> bool:
        """Relative scores of a classifier: unlearning directions and loss changes in log space."""
        return p.normalize == Normalize.RELATIVE and not p.newton and supports_log_space(self.tracked)

    def _unlearned(self, how: Unlearning, queries: Batch, per_sample: bool, *, log_space: bool = False) -> BatchLosses:
        """Losses (log-losses with `log_space`) of θ_K after unlearning the queries; with `log_space`
        normalized SGD steps along the scale-weighted gradient direction (forward_inf_logspace)."""
        learner = self._learner(how, log_space)
        if not per_sample:
            return copies_losses([self._sweepable(unlearn_copy(learner, queries, how), log_space)])
        if self.tracked.is_scripted:
            return copies_losses([self._sweepable(unlearn_copy(learner, queries.slice(q, q + 1), how), log_space)
                                  for q in range(len(queries))])
        evaluated = log_loss_model(self.tracked) if log_space else self.tracked
        return StackedModel(evaluated).batch_losses(StackedModel(learner).unlearn(queries, how))

    def _learner(self, how: Unlearning, log_space: bool) -> ModelAdapter:
        """The model to unlearn: normalized SGD in log space steps along the gradient direction."""
        return direction_model(self.tracked) if log_space and how.optimizer == "normalized_sgd" else self.tracked

    def _sweepable(self, copy: ModelAdapter, log_space: bool) -> ModelAdapter:
        """An unlearned copy evaluating log-losses (`log_space`) or the task's losses. (Its parameters
        no longer require grad: evaluated only, it tracks none.)"""
        if not log_space:
            return copy
        return ModelAdapter(copy.module, LogLossTask(self.tracked.task), device=copy.device)

    def _base_log_losses(self, train: TrainingSet) -> Tensor:
        """`[N]` `log L(θ̂, z_i)`, cached per (model, data, precision)."""
        def compute() -> dict[str, Tensor]:
            tracked = self.tracked
            model = parameter_copy(tracked, tracked.flat_params()) if tracked.is_scripted else tracked
            return {"log_losses": self._sweep(copies_losses([log_loss_model(model)]), train,
                                              self.settings.batch_size, False)[0]}

        args = BaseLogLosses(precision=self.precision)
        return cached_tensors(self.context.store, self.context.fingerprint, args, compute)["log_losses"]

    def _newton_unlearned(self, p: ForwardInfParams, queries: Batch, train: TrainingSet,
                          per_sample: bool) -> tuple[BatchLosses, Tensor]:
        """Losses at θ̂ ± t_q(G + λI)⁻¹∇L_q, one parameter set per query (joint: one set), and
        the `[Q]` factors of their loss changes (`NewtonStep.steps`)."""
        directions = newton_directions(self.tracked, self.estimator(train), queries, per_sample=per_sample)
        step = p.newton_step(1 if per_sample else len(queries), len(train))
        steps, scale = step.steps(self.tracked, directions)
        theta_norm = float(self.tracked.flat_params().double().norm())
        moved = float((steps.abs() * directions.double().norm(dim=1).cpu()).max())
        self.context.extras.update(newton_alpha=step.alpha, newton_step_fraction=moved / max(theta_norm, 1e-300))
        return losses_at(self.tracked, moved_parameters(self.tracked, directions, steps)), scale

    def _candidate_scores(self, candidate: Candidate, queries: Batch, train: TrainingSet, base: Tensor) -> Tensor:
        """Per-sample `[m, n]` scores under a candidate's optimizer/K/α (auto search)."""
        trial = replace(self.settings, optimizer=Optimizer(candidate.optimizer), steps=candidate.steps,
                        lr=candidate.lr, auto=False)
        return self._scores(trial, queries, train, base, per_sample=True, report=False)

    def _subset_gradient_norms(self, subset: TrainingSet) -> dict[str, Tensor]:
        """‖∇L_i‖₂² and ‖∇L_i‖₁ `[n]` of the auto search's subset rows."""
        return gradient_norms(self.tracked, self._view(subset), rows=self._gradient_rows)

    # ----------------------------------------------------------------- RelatIF denominators
    @property
    def _gradient_rows(self) -> int:
        return max(1, min(256, STACK_BUDGET // self.tracked.num_params))

    def _gradient_norms(self, train: TrainingSet, *, report: bool) -> dict[str, Tensor]:
        """‖∇L(θ̂, z_i)‖₂² and ‖∇L(θ̂, z_i)‖₁ `[N]` float64, cached per (model, data, precision, layers)."""
        args = GradientNorms(precision=self.precision, params=self.tracked.param_names)
        return cached_tensors(self.context.store, self.context.fingerprint, args, lambda: gradient_norms(
            self.tracked, self._view(train), rows=self._gradient_rows,
            progress=self.context.progress if report else None,
        ))

    def relative_norm_squared(self, train: TrainingSet) -> Tensor:
        """`[N]` float64 D_i², the square of the row norm RelatIF divides by (module docstring):
        α‖g_i‖₂² (sgd), (α‖g_i‖₂)² (normalized_sgd), (α‖g_i‖₁)² (adam), α g_iᵀ(G + λI)⁻¹g_i
        (newton, α of one row), g_i = ∇L(θ̂, z_i)."""
        started = time.perf_counter()
        if self.settings.newton:
            out = self._newton_first_order(train)
            self.context.timings["gradient_norms_s"] = time.perf_counter() - started
            return out
        norms = self._gradient_norms(train, report=True)
        self.context.timings["gradient_norms_s"] = time.perf_counter() - started
        return relative_denominator(str(self.settings.chosen_optimizer), self.settings.alpha, norms)

    def relative_norm_floor(self) -> float:
        """ε = tiny², tiny = the smallest normal number of the loss dtype: a row whose
        first-order own loss change D_i is below it cannot be resolved in that dtype."""
        if self._log_space(self.settings):  # loss changes resolved in log space, divided in float64
            return torch.finfo(torch.float64).tiny
        tiny = torch.finfo(self.dtype or torch.float32).tiny
        return max(tiny * tiny, torch.finfo(torch.float64).tiny)

    def _newton_first_order(self, train: TrainingSet) -> Tensor:
        """`[N]` float64 α g_iᵀ(G + λI)⁻¹g_i, α = `lr` or 1/N: a row's own first-order loss
        change under the Newton step on itself alone."""
        alpha = self.settings.newton_step(1, len(train)).alpha
        return alpha * newton_self_products(self.tracked, self.estimator(train), self._view(train),
                                            rows=self._gradient_rows, progress=self.context.progress)

    # ----------------------------------------------------------------- self-influence
    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]`: each row unlearned alone (K steps, α; or the Newton step), its own loss change
        (sign as in `score`); the mislabel-audit quantity. `gradient_norm` mode: its first-order
        value for one step, α‖g_i‖₂² (sgd), α‖g_i‖₂ (normalized_sgd), α‖g_i‖₁ (adam),
        α g_iᵀ(G + λI)⁻¹g_i (newton). With training checkpoints θ_c in the context:
        `Σ_c η_c s(θ_c, z_i)` (`checkpoint_self_influence`)."""
        if self.context.checkpoints or self.settings.checkpoint_model_ids:  # the latter: checked against the context
            return self.checkpoint_self_influence(train)
        started = time.perf_counter()
        p = self.settings
        if p.newton:
            out = self._newton_self_influence(p, train)
        elif p.self_influence_mode == SelfInfluenceMode.GRADIENT_NORM:
            norms = self._gradient_norms(train, report=True)
            out = first_order_self_influence(str(p.chosen_optimizer), p.alpha, norms).float()
        else:
            out = self._unlearned_self_influence(p, train, self._base(train))
        self.context.timings["self_influence_s"] = time.perf_counter() - started
        return out

    def checkpoint_self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]` `Σ_c η_c s(θ_c, z_i)`: the self-influence (same setting) at each training checkpoint
        θ_c, η_c-weighted — TracInCP's sum over checkpoints (Pruthi et al. 2020, eq. 3) applied to
        Forward-INF's own loss change. A row that is hard to fit (a flipped label) keeps a large
        loss change through training, while on the final model alone memorised rows look alike:
        on Q4's 300 validation rows (benchmarks/defaults_validation.py q4, 5 checkpoints) the
        flipped-label AUC goes 0.9319 → 0.9790 with the defaults."""
        check_checkpoint_context(self.settings.checkpoint_model_ids, self.settings.checkpoint_lrs, self.context)
        single = replace(self.settings, auto=False, checkpoint_model_ids=(), checkpoint_lrs=())

        def at(checkpoint: ModelAdapter, context: FitContext) -> Tensor:
            method = ForwardInf(checkpoint, single, context)
            method.fit(train)
            return method.self_influence(train)

        return checkpoint_sum(self.model, self.context, len(train), at)

    def _newton_self_influence(self, p: ForwardInfParams, train: TrainingSet) -> Tensor:
        if p.self_influence_mode == SelfInfluenceMode.GRADIENT_NORM:
            return self._newton_first_order(train).float()
        rows = p.chunk_size or max(1, min(1024, STACK_BUDGET // self.tracked.num_params))
        return newton_self_influence(self.tracked, self.estimator(train), self._view(train), self._base(train),
                                     p.newton_step(1, len(train)), rows=rows, amp_dtype=self.context.amp_dtype,
                                     progress=self.context.progress)

    def _unlearned_self_influence(self, p: ForwardInfParams, train: TrainingSet, base: Tensor) -> Tensor:
        total = len(train)
        out = torch.empty(total, dtype=torch.float32)
        stacked_model = None if self.tracked.is_scripted else StackedModel(self.tracked)
        rows = p.chunk_size or max(1, min(1024, STACK_BUDGET // self.tracked.num_params))
        for start, chunk in self._view(train).batches(rows):
            chunk = chunk.to(self.model.device)
            stop = start + len(chunk)
            after = self._own_losses_after(p, chunk, stacked_model)
            out[start:stop] = (p.sign * (after - base[start:stop])).float()
            self.context.progress(stop / total)
        return out

    def _own_losses_after(self, p: ForwardInfParams, rows: Batch, stacked_model: StackedModel | None) -> Tensor:
        """`[B]` L(θ_K^(i), z_i): row i's loss after unlearning row i alone."""
        how = p.gradient_unlearning
        if stacked_model is not None:
            model, stacked = stacked_model, stacked_model.unlearn(rows, how)

            def evaluate(batch: Batch) -> Tensor:
                return model.own_losses(stacked, batch)[None]
        else:
            copies = [unlearn_copy(self.tracked, rows.slice(r, r + 1), how) for r in range(len(rows))]

            def evaluate(batch: Batch) -> Tensor:
                return torch.stack([c.loss(batch.slice(r, r + 1))[0] for r, c in enumerate(copies)])[None]

        one_batch = TensorTrainingSet(rows.inputs, rows.targets)
        return sweep(evaluate, one_batch, batch_size=len(rows), device=self.model.device,
                     amp_dtype=self.context.amp_dtype)[0]
