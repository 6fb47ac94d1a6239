"""Phases of the gradient-feature methods: TracIn, gradient similarity, TRAK, TrackStar
(see `service.costs.plan` for the whole picture)."""

from __future__ import annotations

from attribution.methods.base import MethodName, MethodParams, Normalize
from attribution.methods.gradient_features import CheckpointFeatureParams, GradientFeatureParams
from attribution.methods.gradient_similarity import GradientSimilarityParams, Similarity
from attribution.methods.trackstar import TrackStarParams
from attribution.methods.trak import TrakParams
from attribution.projection import DEFAULT_CACHE_ELEMENTS
from service.costs.model import JobShape, PassKind, Phase, read_phase


def feature_dim(params: MethodParams, size: int) -> int:
    k = getattr(params, "projection_dim", None)
    return size if k is None or k >= size else int(k)


def _featurize(name: str, params: GradientFeatureParams, shape: JobShape, rows: int, passes: int,
               artifact: str | None, kind: PassKind = PassKind.GRADIENT) -> list[Phase]:
    """Gradients of `rows` rows (`passes` times) and their projection; a projection matrix too large
    to keep (P·k above `RandomProjector`'s cache) is redrawn block by block at every batch."""
    size = shape.differentiated
    k = feature_dim(params, size)
    phases = [Phase(name, kind, rows, passes, size, artifact, params.batch_size)]
    if k < size:
        phases.append(Phase(f"{name}_projection", PassKind.PROJECTION, rows, passes, size * k, artifact))
        if size * k > DEFAULT_CACHE_ELEMENTS:
            calls = max(1, -(-rows // params.batch_size)) * passes
            phases.append(Phase(f"{name}_projection_draws", PassKind.RANDOM, 1, calls, size * k, artifact))
    return phases


def _matrix_draws(params: GradientFeatureParams, shape: JobShape, count: int, artifact: str | None = None) -> list[Phase]:
    """A projection matrix small enough to keep is drawn once per projector the method builds."""
    size = shape.differentiated
    k = feature_dim(params, size)
    if k >= size or size * k > DEFAULT_CACHE_ELEMENTS:
        return []
    return [Phase("projection_matrix", PassKind.RANDOM, 1, count, size * k, artifact)]


def _checkpoints(params: MethodParams, shape: JobShape) -> int:
    if isinstance(params, CheckpointFeatureParams):
        return max(1, len(params.checkpoint_model_ids))
    return 1


def gradient_dots(name: MethodName, params: GradientFeatureParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    """TracIn (per checkpoint) and gradient similarity: gradient sweeps, nothing fitted."""
    c, n, q = _checkpoints(params, shape), shape.num_rows, shape.num_queries
    k = feature_dim(params, shape.differentiated)
    if shape.self_influence:
        return _featurize("self_influence", params, shape, n, c, "self_influence"), []
    cosine = isinstance(params, GradientSimilarityParams) and params.similarity is Similarity.COSINE
    kind = PassKind.DIRECTION if cosine else PassKind.GRADIENT
    phases = _matrix_draws(params, shape, 1)
    phases += _featurize("query_features", params, shape, q, c, None, kind)
    phases += _featurize("score_sweep", params, shape, n, c, None, kind)
    phases.append(Phase("dot_products", PassKind.PRODUCT, n, c * (q if shape.per_sample else 1), k))
    if params.normalize == Normalize.RELATIVE and not cosine:
        phases += _matrix_draws(params, shape, 1, "relative_norm")
        phases += _featurize("relative_norm", params, shape, n, c, "relative_norm")
        phases.append(read_phase("read_relative_norm", n * 4))
    return phases, []


def trak(params: TrakParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    c, n, q = _checkpoints(params, shape), shape.num_rows, shape.num_queries
    k = feature_dim(params, shape.differentiated)
    phases = _matrix_draws(params, shape, 2)  # `fit` and `score` each build the featurizers
    phases += _featurize("trak_features", params, shape, n, c, "trak_features")
    phases += [
        Phase("trak_kernel", PassKind.DENSE, n, c, k * k, "trak_features"),
        Phase("trak_cholesky", PassKind.EIGEN, 1, c, k ** 3, "trak_features"),
        Phase("trak_weighting", PassKind.DENSE, n, c, k * k, "trak_features"),
        Phase("trak_loss_weights", PassKind.FORWARD, n, c, shape.num_parameters, "trak_features", params.batch_size),
        read_phase("read_trak_features", c * n * (k + 2) * 4),
    ]
    if not shape.self_influence:
        phases += _featurize("query_features", params, shape, q, c, None)
        phases.append(Phase("trak_products", PassKind.PRODUCT, n, c * (q if shape.per_sample else 1), k))
    return phases, []


def trackstar(params: TrackStarParams, shape: JobShape) -> tuple[list[Phase], list[str]]:
    n, q = shape.num_rows, shape.num_queries
    k = feature_dim(params, shape.differentiated)
    phases: list[Phase] = []
    if params.optimizer_state is None:
        phases.append(Phase("second_moment", PassKind.GRADIENT, min(n, params.fit_rows), 1, shape.differentiated,
                            "trackstar_second_moment", params.batch_size))
    phases += _matrix_draws(params, shape, 1, "trackstar_features")  # kept by the worker process
    phases += _featurize("trackstar_features", params, shape, n, 1, "trackstar_features")
    phases += _featurize("query_features", params, shape, q, 1, None)
    phases.append(Phase("trackstar_products", PassKind.PRODUCT, n, q if shape.per_sample else 1, k))
    phases.append(read_phase("read_trackstar_features", n * k * 4))
    return phases, []
