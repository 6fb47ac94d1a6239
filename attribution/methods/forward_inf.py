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
pass (`forward_inf_engine`).

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
tiny the loss dtype's smallest normal number (a smaller D_i cannot be resolved).

Defaults, chosen by measurement. Leakage on digits, fp32, per-sample queries, "top-1" =
the copy ranked first. LR = the `digits_leakage` fixture (1,220 rows, 20 copies); tanh MLP
= a 64-32-10 tanh MLP trained with Adam on the same set; ReLU = the memorised 64-64-10 ReLU
MLP of the tests (210 rows, 10 copies, 1/4 of rows at zero `F.cross_entropy`); demo = the
product's 64-64-10 ReLU demo model (1,405 rows, 5 copies; TorchScript):

  setting                                    LR /20  tanh /20  ReLU /10  demo /5
  Algorithm 1, SGD K=5 α=0.01                    1        1         2        0
  raw default, SGD K=10 α=1                      8        8         2        0
  raw normalized_sgd K=10 α=1                    7       13         5        1
  raw adam K=10 α=1 (0.1, 0.01: no better)       2        1         4        1
  relative sgd K=1 α=0.01                       20       20         5        3
  relative default, normalized_sgd K=1 α=1e-3   20       20        10        5
  relative normalized_sgd K=1 α=0.01            20       20        10        5
  relative adam K=1 α=1e-4                      18       20         9        5
  relative adam K=10 α=0.1                       0        0         0        0
  auto (picked normalized_sgd K=1 α=1e-3 rel.)  20       20        10        5

Raw scores are dominated by large-gradient rows (first order: α g_iᵀg_q); no raw setting
ranks every copy first. Relative SGD fails where the copies are memorised (above). On a wider
64-256-256-10 ReLU MLP (1,210 rows, 10 copies) relative normalized_sgd ranks 10/10 with
α = 1e-4 or 1e-3 but 9/10 with α = 0.01 (second-order terms), hence α = 1e-3; Adam's
relative default needs α = 1e-4 to stay first-order (α·√P per step). `test_forward_inf.py`
re-measures the LR, tanh and ReLU columns.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from enum import StrEnum

import torch
from torch import Tensor

from attribution.artifacts import artifact_key, cached_tensors
from attribution.data import Batch, TensorTrainingSet, TrainingSet
from attribution.device import precision_tag
from attribution.methods.base import (
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    ParamsError,
)
from attribution.methods.forward_inf_auto import AutoChoice, Candidate, select_hyperparameters
from attribution.methods.forward_inf_engine import (
    BatchLosses,
    CastTrainingSet,
    StackedModel,
    Unlearning,
    cast_batch,
    copies_losses,
    first_order_self_influence,
    gradient_norms,
    relative_denominator,
    sweep,
    unlearn_copy,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter

STACK_BUDGET = 2**24  # stacked parameter elements per self-influence chunk when chunk_size = 0


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


# (K, α) when `steps`/`lr` are not given, per (optimizer, normalize): raw scores need the
# non-linear regime; relative scores are exact in the first-order regime (module docstring).
# An unset optimizer is "sgd", or "normalized_sgd" with normalize="relative".
DEFAULTS: dict[tuple[Optimizer, Normalize], tuple[int, float]] = {
    (Optimizer.SGD, Normalize.NONE): (10, 1.0),
    (Optimizer.SGD, Normalize.RELATIVE): (1, 0.01),
    (Optimizer.NORMALIZED_SGD, Normalize.NONE): (10, 1.0),
    (Optimizer.NORMALIZED_SGD, Normalize.RELATIVE): (1, 0.001),
    (Optimizer.ADAM, Normalize.NONE): (10, 1.0),
    (Optimizer.ADAM, Normalize.RELATIVE): (1, 0.0001),
}


@dataclass(frozen=True)
class ForwardInfParams(MethodParams):
    """Forward-INF hyperparameters.

    `steps` K and `lr` α of the unlearning run; `optimizer` "sgd" (plain: no momentum, no
    weight decay — Algorithm 1), "normalized_sgd" (θ ± α g/‖g‖₂: SGD's direction, a step
    of length α even for a memorised query) or "adam" (torch defaults, `maximize` for
    ascent); unset, it is "sgd", or "normalized_sgd" with `normalize="relative"` (same
    first-order ranking, measurable on memorised queries);
    `layers`: parameter-name prefixes updated during unlearning (empty = every trainable
    parameter); `auto`: choose optimizer/K/α/normalize by self-retrieval
    (`forward_inf_auto`), overriding those four fields;
    `self_influence_mode`: "unlearn" (K steps on the row alone, its own loss change) or
    "gradient_norm" (first order, one step: α‖g_i‖² for SGD, α‖g_i‖₂ for normalized SGD,
    α‖g_i‖₁ for Adam's sign-like first step);
    `precision`: "fp32", or "fp64" (a float64 copy of the model) for small proxies whose
    training losses sit below fp32 resolution (loss changes under ~1e-7 are rounding noise);
    `chunk_size`: rows unlearned together (stacked) when computing self-influence; 0 sizes
    chunks to ~2²⁴ stacked parameter elements.
    Unset `steps`/`lr` take `DEFAULTS[(optimizer, normalize)]`; explicit values are used
    as given. `ForwardInf` works with `resolved()`, where all three are explicit.
    """

    steps: int | None = None
    lr: float | None = None
    direction: Direction = Direction.ASCENT
    optimizer: Optimizer | None = None
    layers: tuple[str, ...] = ()
    auto: bool = False
    self_influence_mode: SelfInfluenceMode = SelfInfluenceMode.UNLEARN
    precision: Precision = Precision.FP32
    chunk_size: int = 0

    def validate(self) -> None:
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ParamsError("steps", "must be between 1 and 1000")
        if self.lr is not None and not 0.0 < self.lr <= 1e6:
            raise ParamsError("lr", "must be in (0, 1e6]")
        if not 0 <= self.chunk_size <= 4096:
            raise ParamsError("chunk_size", "must be between 0 (automatic) and 4096")
        if any(not prefix for prefix in self.layers):
            raise ParamsError("layers", "prefixes must be non-empty strings")

    @property
    def chosen_optimizer(self) -> Optimizer:
        """`optimizer`, or its default: "normalized_sgd" for relative scores, else "sgd"."""
        if self.optimizer is not None:
            return self.optimizer
        return Optimizer.NORMALIZED_SGD if self.normalize == Normalize.RELATIVE else Optimizer.SGD

    @property
    def k(self) -> int:
        """K: `steps`, or the default for the optimizer and normalisation."""
        return self.steps if self.steps is not None else DEFAULTS[self.chosen_optimizer, self.normalize][0]

    @property
    def alpha(self) -> float:
        """α: `lr`, or the default for the optimizer and normalisation."""
        return self.lr if self.lr is not None else DEFAULTS[self.chosen_optimizer, self.normalize][1]

    def resolved(self) -> ForwardInfParams:
        """The same setting with `optimizer`, `steps` and `lr` explicit."""
        return replace(self, optimizer=self.chosen_optimizer, steps=self.k, lr=self.alpha)

    @property
    def unlearning(self) -> Unlearning:
        """A fresh unlearning run (its `log` counts skipped zero-gradient steps)."""
        return Unlearning(str(self.chosen_optimizer), self.k, self.alpha, self.direction == Direction.ASCENT)

    @property
    def sign(self) -> float:
        """+1 for ascent, −1 for descent: higher score always means "supports the query"."""
        return 1.0 if self.direction == Direction.ASCENT else -1.0


@register
class ForwardInf(AttributionMethod):
    """Forward-INF scores `[Q, N]` / `[1, N]`, self-influence `[N]` and the RelatIF
    denominators `[N]` (see module docstring).

    `self.params` holds the resolved setting (explicit optimizer/K/α); with `auto`, `fit`
    replaces it by the chosen one (the pipeline reads the chosen `normalize` from it).
    """

    name = MethodName.FORWARD_INF
    params_type = ForwardInfParams

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        if not isinstance(params, ForwardInfParams):
            raise TypeError("forward_inf takes ForwardInfParams")
        self.settings: ForwardInfParams = params.resolved()
        self.params = self.settings
        self.dtype = torch.float64 if params.precision == Precision.FP64 else None
        module = copy.deepcopy(model.module).double() if self.dtype is not None else model.module
        layers = list(params.layers) or model.layers
        self.tracked = ModelAdapter(module, model.task, device=model.device, layers=layers)
        self.base_losses: Tensor | None = None
        self.auto_choice: AutoChoice | None = None

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
        key = artifact_key("train_losses", self.context.fingerprint, self.precision)
        cached = cached_tensors(self.context.store, key, lambda: {
            "losses": self._sweep(copies_losses([self.tracked]), train, self.settings.batch_size, False)[0]
        })
        self.base_losses = cached["losses"]
        self.context.timings["base_losses_s"] = time.perf_counter() - started
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

    def _scores(self, p: ForwardInfParams, queries: Batch, train: TrainingSet, base: Tensor,
                *, per_sample: bool, report: bool) -> Tensor:
        started = time.perf_counter()
        how = p.unlearning
        evaluate = self._unlearned(how, self._cast(queries), per_sample)
        unlearned = time.perf_counter()
        after = self._sweep(evaluate, train, p.batch_size, report)
        if report:
            self.context.timings["unlearn_s"] = unlearned - started
            self.context.timings["sweep_s"] = time.perf_counter() - unlearned
            if how.log.zero_gradient_steps:
                self.context.extras["zero_gradient_steps"] = how.log.zero_gradient_steps
        return (p.sign * (after - base.unsqueeze(0))).float()

    def _unlearned(self, how: Unlearning, queries: Batch, per_sample: bool) -> BatchLosses:
        if not per_sample:
            return copies_losses([unlearn_copy(self.tracked, queries, how)])
        if self.tracked.is_scripted:
            return copies_losses([unlearn_copy(self.tracked, queries.slice(q, q + 1), how)
                                  for q in range(len(queries))])
        stacked_model = StackedModel(self.tracked)
        return stacked_model.batch_losses(stacked_model.unlearn(queries, how))

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
        key = artifact_key("gradient_norms", self.context.fingerprint, self.precision, self.tracked.param_names)
        return cached_tensors(self.context.store, key, lambda: gradient_norms(
            self.tracked, self._view(train), rows=self._gradient_rows,
            progress=self.context.progress if report else None,
        ))

    def relative_norm_squared(self, train: TrainingSet) -> Tensor:
        """`[N]` float64 D_i², the square of the row norm RelatIF divides by (module docstring):
        α‖g_i‖₂² (sgd), (α‖g_i‖₂)² (normalized_sgd), (α‖g_i‖₁)² (adam), g_i = ∇L(θ̂, z_i)."""
        started = time.perf_counter()
        norms = self._gradient_norms(train, report=True)
        self.context.timings["gradient_norms_s"] = time.perf_counter() - started
        return relative_denominator(str(self.settings.chosen_optimizer), self.settings.alpha, norms)

    def relative_norm_floor(self) -> float:
        """ε = tiny², tiny = the smallest normal number of the loss dtype: a row whose
        first-order own loss change D_i is below it cannot be resolved in that dtype."""
        tiny = torch.finfo(self.dtype or torch.float32).tiny
        return max(tiny * tiny, torch.finfo(torch.float64).tiny)

    # ----------------------------------------------------------------- self-influence
    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]`: each row unlearned alone (K steps, α), its own loss change (sign as in `score`);
        the mislabel-audit quantity. `gradient_norm` mode: its first-order value for one step,
        α‖g_i‖₂² (sgd), α‖g_i‖₂ (normalized_sgd), α‖g_i‖₁ (adam)."""
        started = time.perf_counter()
        p = self.settings
        if p.self_influence_mode == SelfInfluenceMode.GRADIENT_NORM:
            norms = self._gradient_norms(train, report=True)
            out = first_order_self_influence(str(p.chosen_optimizer), p.alpha, norms).float()
        else:
            out = self._unlearned_self_influence(p, train, self._base(train))
        self.context.timings["self_influence_s"] = time.perf_counter() - started
        return out

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
        how = p.unlearning
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
