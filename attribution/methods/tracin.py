"""TracIn (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient
Descent"), the practical checkpoint form TracInCP, eq. (3) of the paper:

    score_i = Σ_c η_c ∇L(θ_c, z_q) · ∇L(θ_c, z_i)

over saved checkpoints θ_c with their learning rates η_c (`FitContext.checkpoints` and
`checkpoint_lrs`; none given: the final model with η = 1). A positive score means a
gradient step on z_i lowered the query loss, i.e. z_i supports the query's prediction,
which is the service's sign convention. The paper's fast variants are params: last-layer
gradients only (`last_layer`, or explicit `layers`) and random projections of the
gradients (`projection_dim`, JL-scaled so dot products are preserved in expectation).

Self-influence (the paper's mislabel detector): `Σ_c η_c ‖∇L(θ_c, z_i)‖²`.
Joint mode scores the mean query loss gradient, `(1/Q) Σ_q ∇L(θ_c, z_q)`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Self

import torch
from pydantic import StrictBool
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    stage_progress,
)
from attribution.methods.gradient_features import (
    CheckpointFeatureParams,
    checkpoint_featurizers,
    dot_scores,
    squared_norms,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter
from attribution.tasks import TaskName


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class TracInParams(CheckpointFeatureParams):
    """TracInCP params: the gradient features' `layers` / `last_layer` / `projection_dim` /
    `projection_type` (see `GradientFeatureParams`), the checkpoints θ_c and their η_c
    (`checkpoint_model_ids` / `checkpoint_lrs`, see `CheckpointFeatureParams`);
    `batch_size` rows per gradient batch. `normalize` defaults to "relative" (RelatIF): measured
    under the fair protocol (benchmarks/results/q3_leakage.md), raw TracIn ranks a leaked copy
    first for few queries, relative TracIn for nearly all; self-influence is unaffected.

    `last_layer` unset (None) is the task's default (`for_task`): true for classifiers (the
    paper's fast variant), false otherwise. Measured on the fair protocol's validation points
    only (benchmarks/defaults_validation.py; the reports' validation columns agree), every
    layer → last layer with 5 checkpoints: Q4 mislabel AUC 0.9815 → 0.9896, Q6 LDS (relative)
    0.2693 → 0.3357, Q3 leakage top-1 1.0 → 1.0; on the final model alone 0.9319 → 0.9372,
    0.2791 → 0.3483, 1.0 → 1.0. Causal LMs keep every layer (benchmarks/results/q8_service.md,
    TracIn validation MRR: last layer 0.365 vs 0.742); regression has no study and keeps them.
    """

    normalize: Normalize = Normalize.RELATIVE
    last_layer: StrictBool | None = None  # type: ignore[assignment]  # None: the task's default

    def for_task(self, task: str) -> Self:
        """These params with `last_layer` resolved for the task (class docstring)."""
        if self.last_layer is not None:
            return self
        return replace(self, last_layer=task == TaskName.CLASSIFICATION and not self.layers)


@register
class TracIn(AttributionMethod):
    """TracInCP: η-weighted sum over checkpoints of query·train loss-gradient dot products."""

    name = MethodName.TRACIN
    row_separable = True  # Σ_c η_c ∇L(θ_c, z_q)·∇L(θ_c, z_i): row i enters only its own term
    params_type = TracInParams
    params: TracInParams

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        if not isinstance(params, TracInParams):
            raise TypeError("tracin takes TracInParams")
        super().__init__(model, params.for_task(model.task.name), context)

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint) `Σ_c η_c φ_c(z_q)·φ_c(z_i)`."""
        started = time.perf_counter()
        featurizers = checkpoint_featurizers(self.model, self.context, self.params)
        rows = len(queries) if per_sample else 1
        total = torch.zeros(rows, len(train), dtype=torch.float32)
        for stage, (featurizer, lr) in enumerate(featurizers):
            query = featurizer.query_features(queries, per_sample, self.params.batch_size)
            progress = stage_progress(self.context.progress, stage, len(featurizers))
            total += lr * dot_scores(featurizer, query, train, self.params.batch_size, progress)
        self.context.timings["tracin_s"] = time.perf_counter() - started
        return total

    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]` `Σ_c η_c ‖φ_c(z_i)‖²`."""
        featurizers = checkpoint_featurizers(self.model, self.context, self.params)
        total = torch.zeros(len(train), dtype=torch.float32)
        for stage, (featurizer, lr) in enumerate(featurizers):
            progress = stage_progress(self.context.progress, stage, len(featurizers))
            total += lr * squared_norms(featurizer, train, self.params.batch_size, progress)
        return total
