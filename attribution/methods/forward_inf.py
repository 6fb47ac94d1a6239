"""Forward-INF: test→train influence by unlearning the query (the mirrored influence hypothesis).

Algorithm 1 of the Forward-INF paper: copy the trained parameters θ̂, take K gradient
**ascent** steps with learning rate α on the query samples' mean loss,

    θ_{k+1} = θ_k + α ∇_θ (1/Q) Σ_q L(θ_k, z_q),        θ_0 = θ̂,

then one forward pass per training row:

    score_i = L(θ_K, z_i) − L(θ̂, z_i)                                   [N]

A row whose loss rises when the model forgets the query supported the query's prediction,
so higher = more supportive (the product's sign convention). With `direction="descent"`
(θ_{k+1} = θ_k − α∇L_q, the mirror of *adding* the query) the sign is flipped,
score_i = L(θ̂, z_i) − L(θ_K, z_i), so the convention holds in both directions. To first
order one SGD step gives score_i ≈ α ∇L_iᵀ ∇L_q.

`L(θ̂, ·)` depends only on model and data: `fit` computes it once and caches it under
`artifact_key("train_losses", fingerprint, precision)`, so a query costs one sweep.
`per_sample` mode unlearns each of the Q queries separately (eager modules: Q stacked
parameter sets updated together through `vmap(functional_call)`; TorchScript: Q copies) and
scores all Q in ONE pass over the training data.

Defaults, chosen by measurement. Leakage on digits: 20 test points copied into the
training set (1,220 rows), per-sample queries, "top-1" = the copy ranked first; LR = the
`digits_leakage` fixture, MLP = a 64-32-10 tanh MLP trained with Adam on the same leaked set
(`tests/attribution/test_forward_inf.py::test_leakage_rates` re-measures them):

  setting                                       LR fp32   MLP fp32   MLP fp64
  Algorithm 1 as usually run, SGD K=5 α=0.01       1/20       1/20       1/20
  raw default, SGD K=10 α=1                        8/20       8/20       8/20
  SGD K=5 α=100                                    8/20       0/20       0/20
  Adam K=10 α=0.1                                  2/20       0/20       0/20
  relative default, SGD K=1 α=0.01                20/20       0/20      20/20
  auto (self-retrieval, forward_inf_auto)         20/20       6/20      20/20

Raw scores are limited by large-gradient rows: to first order score_i ≈ α∇L_iᵀ∇L_q, and in
the non-linear regime (large α) by rows with large input norm; no K/α grid above 8/20 was
found for either model, and Adam's sign-like first step is worse. Relative normalisation
(pipeline) divides by sqrt(self-influence) ≈ sqrt(α)‖∇L_i‖, which by Cauchy–Schwarz makes an
exact copy the maximum in the first-order regime — hence its small-step defaults. On the
MLP most training losses are below 1e-3 and the small loss changes sink under fp32
rounding (~1e-7): `precision="fp64"` fixes it for small proxy models. The default optimizer
stays plain SGD so `{"steps": 5, "lr": 0.01}` is exactly Algorithm 1.
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
    sweep,
    unlearn_copy,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter

# (K, α) when `steps`/`lr` are not given: raw scores need the non-linear regime; relative
# scores are exact in the first-order regime (see the module docstring for the evidence).
RAW_DEFAULTS = (10, 1.0)
RELATIVE_DEFAULTS = (1, 0.01)
STACK_BUDGET = 2**24  # stacked parameter elements per self-influence chunk when chunk_size = 0


class Direction(StrEnum):
    ASCENT = "ascent"
    DESCENT = "descent"


class Optimizer(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class SelfInfluenceMode(StrEnum):
    UNLEARN = "unlearn"
    GRADIENT_NORM = "gradient_norm"


class Precision(StrEnum):
    FP32 = "fp32"
    FP64 = "fp64"


@dataclass(frozen=True)
class ForwardInfParams(MethodParams):
    """Forward-INF hyperparameters.

    `steps` K and `lr` α of the unlearning run; `optimizer` "sgd" (plain: no momentum, no
    weight decay — Algorithm 1) or "adam" (torch defaults, `maximize` for ascent);
    `layers`: parameter-name prefixes updated during unlearning (empty = every trainable
    parameter); `auto`: choose optimizer/K/α/normalize by self-retrieval
    (`forward_inf_auto`), overriding those four fields;
    `self_influence_mode`: "unlearn" (K steps on the row alone, its own loss change) or
    "gradient_norm" (first order: α‖g_i‖² for SGD, α‖g_i‖₁ for Adam's sign-like first step);
    `precision`: "fp32", or "fp64" (a float64 copy of the model) for small proxies whose
    training losses sit below fp32 resolution (loss changes under ~1e-7 are rounding noise);
    `chunk_size`: rows unlearned together (stacked) when computing self-influence; 0 sizes
    chunks to ~2²⁴ stacked parameter elements.
    Unset `steps`/`lr` default to K=10, α=1 for raw scores and K=1, α=0.01 with
    `normalize="relative"`; explicit values are used as given.
    """

    steps: int | None = None
    lr: float | None = None
    direction: Direction = Direction.ASCENT
    optimizer: Optimizer = Optimizer.SGD
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
    def k(self) -> int:
        """K: `steps`, or the default for the chosen normalisation."""
        return self.steps if self.steps is not None else self._defaults[0]

    @property
    def alpha(self) -> float:
        """α: `lr`, or the default for the chosen normalisation."""
        return self.lr if self.lr is not None else self._defaults[1]

    @property
    def _defaults(self) -> tuple[int, float]:
        return RELATIVE_DEFAULTS if self.normalize == Normalize.RELATIVE else RAW_DEFAULTS

    @property
    def unlearning(self) -> Unlearning:
        return Unlearning(str(self.optimizer), self.k, self.alpha, self.direction == Direction.ASCENT)

    @property
    def sign(self) -> float:
        """+1 for ascent, −1 for descent: higher score always means "supports the query"."""
        return 1.0 if self.direction == Direction.ASCENT else -1.0


@register
class ForwardInf(AttributionMethod):
    """Forward-INF scores `[Q, N]` / `[1, N]` and self-influence `[N]` (see module docstring).

    With `auto`, `fit` replaces `self.params` by the chosen setting (the pipeline reads the
    chosen `normalize` from it).
    """

    name = MethodName.FORWARD_INF
    params_type = ForwardInfParams

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        if not isinstance(params, ForwardInfParams):
            raise TypeError("forward_inf takes ForwardInfParams")
        self.settings: ForwardInfParams = params
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
                self.settings, train, self.base_losses, self.context,
                self._candidate_scores, self._candidate_self_influence, precision=self.precision,
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
        evaluate = self._unlearned(p, self._cast(queries), per_sample)
        unlearned = time.perf_counter()
        after = self._sweep(evaluate, train, p.batch_size, report)
        if report:
            self.context.timings["unlearn_s"] = unlearned - started
            self.context.timings["sweep_s"] = time.perf_counter() - unlearned
        return (p.sign * (after - base.unsqueeze(0))).float()

    def _unlearned(self, p: ForwardInfParams, queries: Batch, per_sample: bool) -> BatchLosses:
        how = p.unlearning
        if not per_sample:
            return copies_losses([unlearn_copy(self.tracked, queries, how)])
        if self.tracked.is_scripted:
            return copies_losses([unlearn_copy(self.tracked, queries.slice(q, q + 1), how)
                                  for q in range(len(queries))])
        stacked_model = StackedModel(self.tracked)
        return stacked_model.batch_losses(stacked_model.unlearn(queries, how))

    def _trial(self, candidate: Candidate) -> ForwardInfParams:
        return replace(self.settings, optimizer=Optimizer(candidate.optimizer), steps=candidate.steps,
                       lr=candidate.lr, auto=False)

    def _candidate_scores(self, candidate: Candidate, queries: Batch, train: TrainingSet, base: Tensor) -> Tensor:
        """Per-sample `[m, n]` scores under a candidate's optimizer/K/α (auto search)."""
        return self._scores(self._trial(candidate), queries, train, base, per_sample=True, report=False)

    def _candidate_self_influence(self, candidate: Candidate, train: TrainingSet, base: Tensor) -> Tensor:
        """`[n]` self-influence under a candidate's optimizer/K/α (auto search)."""
        return self._self_influence(self._trial(candidate), train, base, report=False)

    # ----------------------------------------------------------------- self-influence
    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]`: each row unlearned alone (K steps, α), its own loss change (sign as in `score`).

        `gradient_norm` mode: the first-order value α‖∇L_i‖² (SGD) or α‖∇L_i‖₁ (Adam).
        """
        started = time.perf_counter()
        out = self._self_influence(self.settings, train, self._base(train), report=True)
        self.context.timings["self_influence_s"] = time.perf_counter() - started
        return out

    def _self_influence(self, p: ForwardInfParams, train: TrainingSet, base: Tensor, *, report: bool) -> Tensor:
        total = len(train)
        out = torch.empty(total, dtype=torch.float32)
        stacked_model = None if self.tracked.is_scripted else StackedModel(self.tracked)
        rows = p.chunk_size or max(1, min(1024, STACK_BUDGET // self.tracked.num_params))
        for start, chunk in self._view(train).batches(rows):
            chunk = chunk.to(self.model.device)
            stop = start + len(chunk)
            if p.self_influence_mode == SelfInfluenceMode.GRADIENT_NORM:
                grads = self.tracked.per_sample_grads(chunk, chunk_size=min(rows, 256))
                norm = grads.abs().sum(1) if p.optimizer == Optimizer.ADAM else (grads**2).sum(1)
                out[start:stop] = (p.alpha * norm).float().cpu()
            else:
                after = self._own_losses_after(p, chunk, stacked_model)
                out[start:stop] = (p.sign * (after - base[start:stop])).float()
            if report:
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
