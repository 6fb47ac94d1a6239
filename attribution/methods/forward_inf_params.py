"""Forward-INF's hyperparameters: `ForwardInfParams`, its enums and the (K, α) defaults.

The rationale for the defaults (measured leakage retrieval) is in `forward_inf`'s module
docstring; Newton-step unlearning is described in `forward_inf_newton`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from enum import StrEnum
from typing import Any, Self

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass

from attribution.methods.base import (
    PARAMS_CONFIG,
    ContextInputs,
    MethodParams,
    Normalize,
    ParamsError,
)
from attribution.methods.checkpoints import check_checkpoint_params
from attribution.methods.forward_inf_newton import NewtonStep, removal_scale
from attribution.methods.forward_inf_unlearning import Unlearning
from attribution.methods.influence import IHVPParams


class Direction(StrEnum):
    ASCENT = "ascent"
    DESCENT = "descent"


class Optimizer(StrEnum):
    SGD = "sgd"
    NORMALIZED_SGD = "normalized_sgd"
    ADAM = "adam"


class SelfInfluenceMode(StrEnum):
    UNLEARN = "unlearn"
    GRADIENT_NORM = "gradient_norm"


class Precision(StrEnum):
    FP32 = "fp32"
    FP64 = "fp64"


class StopRule(StrEnum):
    FIXED = "fixed"  # exactly K steps
    FORGOTTEN = "forgotten"  # until the query loss reaches its forgotten level, at most K (`forward_inf_stopping`)


class UnlearningScope(StrEnum):
    ALL = "all"  # every trainable parameter (or the `layers` prefixes)
    EMBEDDINGS = "embeddings"  # the token embeddings only (`forward_inf_scope.token_embedding_names`)


class UnlearningRule(StrEnum):
    GRADIENT = "gradient"  # Algorithm 1: K optimizer steps on the query loss
    NEWTON = "newton"  # one step θ̂ ± α(G + λI)⁻¹∇L_q (`forward_inf_newton`)


# The iHVP arguments (`IHVPParams`, shared with the influence method) only the Newton step uses.
_IHVP_FIELDS = tuple(f for f in fields(IHVPParams) if f.name not in {g.name for g in fields(MethodParams)})


# (K, α) when `steps`/`lr` are not given, per optimizer: one step in the first-order regime,
# for raw and relative scores alike (`forward_inf` module docstring: measured across Q2–Q5).
# An unset optimizer is "sgd", or "normalized_sgd" with normalize="relative".
DEFAULTS: dict[Optimizer, tuple[int, float]] = {
    Optimizer.SGD: (1, 0.01),
    Optimizer.NORMALIZED_SGD: (1, 0.001),
    Optimizer.ADAM: (1, 0.0001),
}


# What a causal LM gets for the fields left unset (`ForwardInfParams.for_task`): K = 20 normalised
# ascent steps of α = 0.05 (an ascent of length 1 in parameter space) in the token embeddings only
# (`scope="embeddings"`, `forward_inf_scope`), relative scores. The scope was chosen on Q8's 50
# validation facts (disjoint from the 50 evaluated; in-process, same model and facts, K = 20 α = 0.05,
# relative): every parameter 0.910, the blocks only (no embeddings) 0.887, the token embeddings only
# 1.000; other variants tried there, all below: K = 10 / 40 0.865 / 0.902, α = 0.1 0.900, Adam
# α = 1e-4 0.697, the row's own K-step unlearning as the denominator 0.820, Σ_c over 5 training
# checkpoints 0.804. Through the service on the same 50 validation facts (q8_service's grid), the
# embeddings scope scores 1.000 with stop="forgotten", with K = 10 α = 0.1 and with K = 20 α = 0.05
# alike (saturated), every parameter 0.910. Ascent over every parameter forgets the query's *template* (the attention and
# MLP weights every sentence shares): sentences with the query's wording and answer but another
# subject rose as much as the fact's own statements. K, α, stop were chosen earlier on Q8's 10
# validation facts only (never the evaluated ones; GPT-2 2×64 saved with defaults,
# relative scores, validation MRR). Through the service (benchmarks/results/q8_service.md's grid):
# fixed K = 20 α = 0.05 → 0.925, forgotten α = 0.05 (cap 20, the former default) → 0.848, fixed
# K = 10 α = 0.1 → 0.833, forgotten α = 0.02 cap 50 → 0.832. In-process on the same model and
# facts: fixed α = 0.05 with K = 10 / 20 / 40 → 0.950 / 1.000 / 1.000, K = 40 α = 0.025 → 0.950,
# forgotten α = 0.05 → 0.825 (it stops after 2–5 steps: reaching the forgotten level is too
# early; tracing gains from ascending further). Earlier grid: forgotten α = 0.01 / 0.02 / 0.1 /
# 0.2 → 0.825 / 0.832 / 0.675 / 0.607; fixed K = 5 α = 0.1 → 0.662; the first default, sgd K = 1
# α = 0.01: 0.26 (benchmarks/results/q8_lm_tracing.md). `stop="forgotten"` stays available.
# Classifiers and regressors keep the defaults above.
CAUSAL_LM_DEFAULTS: dict[str, Any] = {
    "stop": StopRule.FIXED, "optimizer": Optimizer.NORMALIZED_SGD, "steps": 20, "lr": 0.05,
    "normalize": Normalize.RELATIVE, "scope": UnlearningScope.EMBEDDINGS,
}
# `normalize` unset means relative outside causal LMs too (the fair protocol's Q3 validation
# copies: benchmarks/results/q3_leakage.md).
_BASE_NORMALIZE = Normalize.RELATIVE


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class ForwardInfParams(IHVPParams):
    """Forward-INF hyperparameters.

    `unlearning`: "gradient" (Algorithm 1, the fields below) or "newton" (one step
    θ̂ ± α(G + λI)⁻¹∇L_q, `forward_inf_newton`: `lr` is the literal step α; unset, α = Q/N,
    the removal scale, reached by a finite-difference step of length 10⁻³‖θ̂‖; `direction`, `layers`, `precision`, `self_influence_mode`, `chunk_size` apply;
    the iHVP is chosen and fitted by the influence method's arguments `ihvp`, `curvature`,
    `damping`, `cg_*`, `lissa_*`, `arnoldi_*`, `exact_max_params`, `fit_*` (inherited from
    `IHVPParams`, rejected unless unlearning is "newton"); `optimizer`, `steps` ≠ 1 and
    `auto` are rejected).
    `steps` K and `lr` α of the unlearning run; `optimizer` "sgd" (plain: no momentum, no
    weight decay — Algorithm 1), "normalized_sgd" (θ ± α g/‖g‖₂: SGD's direction, a step
    of length α even for a memorised query) or "adam" (torch defaults, `maximize` for
    ascent); unset, it is "sgd", or "normalized_sgd" with `normalize="relative"` (same
    first-order ranking, measurable on memorised queries);
    `layers`: parameter-name prefixes updated during unlearning (empty = every trainable
    parameter, or the `scope`); `scope`: "all" (every trainable parameter, or `layers`) or
    "embeddings" (the token embeddings only, input and output: `forward_inf_scope`; not with
    `layers`): the unlearning steps, the gradient norms of relative scores and self-influence
    then all live in those parameters; `auto`: choose optimizer/K/α/normalize by self-retrieval
    (`forward_inf_auto`), overriding those four fields;
    `self_influence_mode`: "unlearn" (K steps on the row alone, its own loss change) or
    "gradient_norm" (first order, one step: α‖g_i‖² for SGD, α‖g_i‖₂ for normalized SGD,
    α‖g_i‖₁ for Adam's sign-like first step);
    `precision`: "fp32", or "fp64" (a float64 copy of the model) for small proxies whose
    training losses sit below fp32 resolution (loss changes under ~1e-7 are rounding noise);
    `normalize`: "relative" by default (the unit-ball bound of `forward_inf`'s docstring; measured
    under the fair protocol, benchmarks/results/q3_leakage.md: raw first-order scores track the
    gradient dot product and rank a leaked copy first for few queries); self-influence ignores it.
    `chunk_size`: rows unlearned together (stacked) when computing self-influence; 0 sizes
    chunks to ~2²⁴ stacked parameter elements.
    `stop`: "fixed" (exactly K steps) or "forgotten" (a label-free stopping rule: each
    query's run stops once its loss reaches the loss the model gives its answer after a
    shuffled context, at most K = `steps` steps; `forward_inf_stopping`); `normalize` as in
    every method.
    Task defaults (`for_task`): a causal LM's unset `stop`, `optimizer`, `steps`, `lr`,
    `normalize` and `scope` take `CAUSAL_LM_DEFAULTS` (with `auto` or Newton unlearning, only
    `normalize`; `scope` only without `layers`); otherwise unset `stop` is "fixed", unset
    `normalize` "relative", unset `scope` "all".
    Unset `steps`/`lr` take `DEFAULTS[optimizer]`; explicit values are used
    as given. `ForwardInf` works with `for_task(task).resolved()`, where all are explicit.
    `checkpoint_model_ids` / `checkpoint_lrs`: training checkpoints θ_c and their η_c (resolved
    into `FitContext.checkpoints` like TracIn's); used by self-influence only, which becomes
    `Σ_c η_c s(θ_c, z_i)` (TracInCP's sum over checkpoints; `ForwardInf.self_influence`).
    """

    # None = the task's default (`for_task`); the base class's field is a plain `Normalize`.
    normalize: Normalize | None = None  # type: ignore[assignment]

    steps: StrictInt | None = None
    lr: StrictFloat | None = None
    direction: Direction = Direction.ASCENT
    optimizer: Optimizer | None = None
    layers: tuple[StrictStr, ...] = ()
    auto: StrictBool = False
    self_influence_mode: SelfInfluenceMode = SelfInfluenceMode.UNLEARN
    precision: Precision = Precision.FP32
    chunk_size: StrictInt = 0
    unlearning: UnlearningRule = UnlearningRule.GRADIENT
    stop: StopRule | None = None
    scope: UnlearningScope | None = None
    checkpoint_model_ids: tuple[StrictStr, ...] = ()
    checkpoint_lrs: tuple[StrictFloat, ...] = ()

    def context_inputs(self) -> ContextInputs:
        return ContextInputs(checkpoint_model_ids=self.checkpoint_model_ids, checkpoint_lrs=self.checkpoint_lrs)

    def check(self) -> None:
        super().check()
        check_checkpoint_params(self.checkpoint_model_ids, self.checkpoint_lrs)
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ParamsError("steps", "must be between 1 and 1000")
        if self.lr is not None and not 0.0 < self.lr <= 1e6:
            raise ParamsError("lr", "must be in (0, 1e6]")
        if not 0 <= self.chunk_size <= 4096:
            raise ParamsError("chunk_size", "must be between 0 (automatic) and 4096")
        if any(not prefix for prefix in self.layers):
            raise ParamsError("layers", "prefixes must be non-empty strings")
        if self.layers and self.scope == UnlearningScope.EMBEDDINGS:
            raise ParamsError("layers", "scope='embeddings' chooses the unlearned parameters; give one of the two")
        if self.newton:
            if self.optimizer is not None:
                raise ParamsError("optimizer", "does not apply to unlearning='newton' (one Newton step, no optimizer)")
            if self.steps not in (None, 1):
                raise ParamsError("steps", "unlearning='newton' takes a single Newton step: leave steps unset or 1")
            if self.auto:
                raise ParamsError("auto", "searches gradient-unlearning settings; it does not apply to "
                                          "unlearning='newton'")
            if self.stop == StopRule.FORGOTTEN:
                raise ParamsError("stop", "'forgotten' stops gradient unlearning; unlearning='newton' takes one step")
            return
        for f in _IHVP_FIELDS:
            if getattr(self, f.name) != f.default:
                raise ParamsError(f.name, "applies to unlearning='newton' only (the iHVP of the Newton step)")

    def for_task(self, task: str) -> Self:
        """These params with the task's defaults in the unset fields (class docstring)."""
        if task == "causal_lm":
            searched = self.newton or self.auto  # the optimizer/K/α are the Newton step's or auto's
            fill = {k: v for k, v in CAUSAL_LM_DEFAULTS.items()
                    if getattr(self, k) is None and (not searched or k == "normalize")}
            if self.stop is None and self.steps is not None:  # an explicit K is taken as given
                fill.pop("stop", None)
            if self.layers:  # explicit layers choose the unlearned parameters
                fill.pop("scope", None)
            resolved = replace(self, **fill)
        else:
            resolved = self
        return replace(resolved, stop=resolved.stop or StopRule.FIXED,
                       normalize=resolved.normalize or _BASE_NORMALIZE, scope=resolved.scope or UnlearningScope.ALL)

    @property
    def newton(self) -> bool:
        """True for Newton-step unlearning."""
        return UnlearningRule(self.unlearning) is UnlearningRule.NEWTON

    @property
    def chosen_optimizer(self) -> Optimizer:
        """`optimizer`, or its default: "normalized_sgd" for relative scores, else "sgd"."""
        if self.optimizer is not None:
            return self.optimizer
        return Optimizer.NORMALIZED_SGD if self.normalize == Normalize.RELATIVE else Optimizer.SGD

    @property
    def k(self) -> int:
        """K: `steps`, or the optimizer's default."""
        return self.steps if self.steps is not None else DEFAULTS[self.chosen_optimizer][0]

    @property
    def alpha(self) -> float:
        """α: `lr`, or the optimizer's default."""
        return self.lr if self.lr is not None else DEFAULTS[self.chosen_optimizer][1]

    def resolved(self) -> ForwardInfParams:
        """The same setting with `optimizer`, `steps` and `lr` explicit (Newton: unchanged,
        α = Q/N is resolved per query from the training-set size)."""
        if self.newton:
            return self
        return replace(self, optimizer=self.chosen_optimizer, steps=self.k, lr=self.alpha)

    def newton_step(self, num_queries: int, num_rows: int) -> NewtonStep:
        """The Newton step for Q query samples and N rows: `lr` literal, or α = Q/N estimated by
        a finite-difference step (`forward_inf_newton`)."""
        alpha = self.lr if self.lr is not None else removal_scale(num_queries, num_rows)
        return NewtonStep(alpha, self.lr, self.sign)

    @property
    def gradient_unlearning(self) -> Unlearning:
        """A fresh unlearning run (its `log` counts skipped zero-gradient steps)."""
        return Unlearning(str(self.chosen_optimizer), self.k, self.alpha, self.direction == Direction.ASCENT,
                          until_forgotten=self.stop == StopRule.FORGOTTEN)

    @property
    def sign(self) -> float:
        """+1 for ascent, −1 for descent: higher score always means "supports the query"."""
        return 1.0 if self.direction == Direction.ASCENT else -1.0
