"""Gradient similarity: how alike the query's and each training row's loss gradients are
at the final model θ̂ (the "grad-dot" / "grad-cos" baselines of Hanawa et al. 2021,
"Evaluation of Similarity-based Explanations"):

    dot:     score_i = g_q · g_i
    cosine:  score_i = g_q · g_i / (‖g_q‖ ‖g_i‖)          (0 when either gradient is 0)

with `g(z) = ∇_θ L(θ̂, z)`, optionally restricted to some layers and randomly projected.

Cosine is the default because it is the variant that finds copies: raw dot products are
dominated by the few training rows with huge gradients (on digits the largest are
100–300× the median), so a planted copy of the query rarely ranks first, while the cosine
puts it first for 20/20 queries on the digits leakage fixture (dot: 1/20; see
tests/attribution/test_gradient_similarity.py). Joint mode compares the mean query loss
gradient.

The cosine needs only each gradient's direction, so it is computed from
`attribution.gradient_directions` (`g = s g̃` with `log s` exact): a memorised row whose fp32
gradient underflows to 0 (margin above ~87; its squared norm already below ~45) keeps its
direction, and a planted copy of a memorised query still ranks first. Joint mode uses the
direction of `Σ_q s_q g̃_q`, the mean query gradient's.

Self-influence: `‖g_i‖²` for the dot product. For the cosine it would be the constant 1,
which ranks nothing, so `self_influence` refuses it with a clear error, and
`normalize="relative"` (which divides by √self-influence) is rejected with the cosine —
the cosine is already normalised.
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.gradient_directions import (
    gradient_directions,
    loss_gradient_directions,
    weighted_direction,
)
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    MethodName,
    Normalize,
    ParamsError,
)
from attribution.methods.gradient_features import (
    GradientFeatureParams,
    GradientFeaturizer,
    dot_scores,
    loss_gradients,
    squared_norms,
    unit,
)
from attribution.methods.registry import register


class Similarity(StrEnum):
    DOT = "dot"
    COSINE = "cosine"


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class GradientSimilarityParams(GradientFeatureParams):
    """`similarity`: `cosine` (default) or `dot`; plus the gradient-feature params."""

    similarity: Similarity = Similarity.COSINE

    def check(self) -> None:
        super().check()
        if self.similarity is Similarity.COSINE and self.normalize is Normalize.RELATIVE:
            raise ParamsError("normalize", "the cosine similarity is already normalised; "
                                           "use normalize='none' or similarity='dot'")


@register
class GradientSimilarity(AttributionMethod):
    """Dot product or cosine between query and training loss gradients at the final model."""

    name = MethodName.GRADIENT_SIMILARITY
    row_separable = True  # sim(∇L_q, ∇L_i) reads row i alone
    params_type = GradientSimilarityParams
    params: GradientSimilarityParams

    def _featurizer(self) -> GradientFeaturizer:
        cosine = self.params.similarity is Similarity.COSINE
        return GradientFeaturizer.for_params(self.model, self.params,
                                             loss_gradient_directions if cosine else loss_gradients)

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint) similarities `s(g_q, g_i)`."""
        started = time.perf_counter()
        featurizer = self._featurizer()
        cosine = self.params.similarity is Similarity.COSINE
        if cosine and not per_sample:
            directions, log_scale = gradient_directions(featurizer.model, queries, self.params.batch_size)
            query = weighted_direction(featurizer.project(directions), log_scale)
        else:
            query = featurizer.query_features(queries, per_sample, self.params.batch_size)
        if cosine:
            query = unit(query)
        scores = dot_scores(featurizer, query, train, self.params.batch_size,
                            self.context.progress, unit_rows=cosine)
        self.context.timings["gradient_similarity_s"] = time.perf_counter() - started
        return scores

    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]` `‖g_i‖²` (dot product only; the cosine self-similarity is constant)."""
        if self.params.similarity is Similarity.COSINE:
            raise ValueError("gradient_similarity with similarity='cosine' has a constant "
                             "self-influence (1) that ranks nothing; use similarity='dot'")
        return squared_norms(self._featurizer(), train, self.params.batch_size, self.context.progress)
