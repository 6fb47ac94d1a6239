"""TrackStar (Chang et al. 2024, "Scalable Influence and Fact Tracing for Large Language
Model Pretraining", §3): the cosine between optimizer-corrected, randomly projected loss
gradients,

    φ(z) = unit( (g(z) ⊘ (√v + ε)) R ) ∈ ℝ^k,      g(z) = ∇_θ L(θ̂, z) ∈ ℝ^P,
    score(z_q, z_i) = φ(z_q) · φ(z_i)   ∈ [−1, 1],

with ⊘ element-wise division and unit(x) = x / ‖x‖ (a zero vector stays zero). A positive
score means a descent step on z_i lowers the query's loss (in Adam's geometry): z_i
supports the prediction, the service's sign convention.

- v `[P]`, the optimizer's second moment: Adam's `exp_avg_sq` when the user registers it
  (`params.optimizer_state`, a `file://` URI of a safetensors file `{parameter name: v}`
  that the service resolves into `FitContext.second_moment`, see `attribution.optimizer_state`);
  otherwise an estimate, the mean squared per-sample gradient over the first `fit_rows`
  training rows, `v_j = (1/n) Σ_i g_ij(z_i)²` (the empirical Fisher's diagonal), computed
  once per (model, dataset, layers, fit_rows) and stored.
- ε: `params.eps`, by default Adam's 1e-8 with the optimizer state and, for the estimate,
  `ESTIMATE_EPS_FRACTION · mean_j √v_j`, so coordinates the fit sample never touched
  (v_j = 0, e.g. embeddings of tokens absent from it) are not amplified without bound.
- R `[P, k]`: the seeded projection of `attribution.projection` (`projection_dim` k,
  default 1024; none when k ≥ P).
- Joint mode scores the mean query feature, `(1/Q) Σ_q φ(z_q) · φ(z_i)`, the mean cosine.

Two phases, as in TRAK: `fit` builds the training features Φ `[N, k]` (unit rows) once per
(model, dataset, fit arguments) and stores them as files beside the JSON of those arguments
(`attribution.feature_files`; never through Redis); every query then costs its own Q
per-sample gradients, one projection and one `[Q, k] × [k, N]` product streamed over the
memory-mapped Φ, `CHUNK_BYTES` of it per matrix product (zero-copy views of the map), so
memory stays O(Q·N) beyond the page cache.

Not implemented from the paper: the task-specific whitening `R^{-1/2}` of the projected
gradients (their mixed training/evaluation Gauss–Newton approximation in ℝ^k) and the
paper's projection of per-layer Kronecker factors; this is their "optimizer-corrected,
unit-normalised" variant. Self-influence is the constant 1, so it is refused (like
`gradient_similarity`'s cosine), and so is `normalize="relative"`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.artifacts import FitArgs
from attribution.curvature import curvature_batches
from attribution.data import Batch, TrainingSet
from attribution.feature_files import EntryWriter, FeatureFiles, read_array, streamed_product
from attribution.interrupts import check_interrupt
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    ContextInputs,
    FitContext,
    MethodName,
    Normalize,
    ParamsError,
)
from attribution.methods.gradient_features import (
    GradientFeatureParams,
    GradientFeaturizer,
    make_projector,
    restricted,
    selected_layers,
    unit,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter
from attribution.projection import RandomProjector

ADAM_EPS = 1e-8
ESTIMATE_EPS_FRACTION = 1e-3
GRADIENT_CHUNK_ELEMENTS = 1 << 22  # [rows, P] per-sample gradients per vmap call (64 to 1,024 rows)
CHUNK_BYTES = 256 << 20  # rows of Φ per product call: zero-copy views of the memory map
FEATURES_KIND = "trackstar"
SECOND_MOMENT_KIND = "trackstar_second_moment"


class SecondMomentFit(FitArgs):
    """The `FeatureFiles` entry of the estimated second moment `[P]`: data, tracked parameters and
    the n = min(fit_rows, N) rows averaged."""

    kind = SECOND_MOMENT_KIND
    fingerprint: str
    num_rows: int
    layers: list[str]
    fit_rows: int

    @classmethod
    def of(cls, params: TrackStarParams, *, fingerprint: str, num_rows: int, layers: Sequence[str]) -> SecondMomentFit:
        return cls(fingerprint=fingerprint, num_rows=num_rows, layers=list(layers),
                   fit_rows=min(params.fit_rows, num_rows))


class FeaturesFit(FitArgs):
    """The `FeatureFiles` entry of the corrected features Φ `[N, k]`: data, tracked parameters, the
    feature dimension k and projection, seed, the second moment's source (the registered
    optimizer state's sha256, or the estimate's rows) and ε."""

    kind = FEATURES_KIND
    method: str
    fingerprint: str
    num_rows: int
    layers: list[str]
    dim: int
    projected: bool
    projection_type: str
    seed: int
    second_moment: dict[str, Any]
    eps: float | None

    @classmethod
    def of(cls, params: TrackStarParams, *, fingerprint: str, num_rows: int, layers: Sequence[str], dim: int,
           projected: bool, optimizer_state_sha256: str | None) -> FeaturesFit:
        source: dict[str, Any] = ({"optimizer_state_sha256": optimizer_state_sha256}
                                  if optimizer_state_sha256 is not None
                                  else {"estimate_fit_rows": min(params.fit_rows, num_rows)})
        return cls(method=MethodName.TRACKSTAR.value, fingerprint=fingerprint, num_rows=num_rows, layers=list(layers),
                   dim=dim, projected=projected, projection_type=params.projection_type.value, seed=params.seed,
                   second_moment=source, eps=params.eps)


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class TrackStarParams(GradientFeatureParams):
    """`projection_dim` k (default 1024; `None` or ≥ P: no projection), `projection_type`,
    `seed`, `layers` / `last_layer` (see `GradientFeatureParams`); `optimizer_state`: a
    `file://` URI (inside the data root) of a safetensors file of Adam `exp_avg_sq` tensors
    keyed by parameter name; `fit_rows`: rows of the second-moment estimate used without it;
    `eps` ε (`None`: see the module docstring); `batch_size`: rows per gradient batch."""

    projection_dim: StrictInt | None = 1024
    optimizer_state: StrictStr | None = None
    fit_rows: StrictInt = 1000
    eps: StrictFloat | None = None

    def check(self) -> None:
        super().check()
        if self.normalize is Normalize.RELATIVE:
            raise ParamsError("normalize", "trackstar scores are cosines, already normalised; use normalize='none'")
        if self.fit_rows < 1:  # the maximum is in attribution.methods.limits
            raise ParamsError("fit_rows", "must be at least 1")
        if self.eps is not None and not self.eps >= 0:
            raise ParamsError("eps", "must be ≥ 0")
        if self.optimizer_state is not None and not self.optimizer_state.startswith("file://"):
            raise ParamsError("optimizer_state", "must be a file:// URI of a safetensors file inside the data root")

    def context_inputs(self) -> ContextInputs:
        return ContextInputs(optimizer_state=self.optimizer_state)


@register
class TrackStar(AttributionMethod):
    """Cosine of optimizer-corrected projected gradients over stored training features."""

    name = MethodName.TRACKSTAR
    params_type = TrackStarParams
    params: TrackStarParams
    supports_self_influence = False

    def __init__(self, model: ModelAdapter, params: TrackStarParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        if params.optimizer_state is not None and context.second_moment is None:
            raise ValueError("params.optimizer_state is set but FitContext.second_moment is empty; "
                             "the service resolves the file into the context")
        self._scratch: tempfile.TemporaryDirectory[str] | None = None  # removed with the instance
        if context.feature_files is not None:
            self.files = context.feature_files
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="trackstar-")
            self.files = FeatureFiles(Path(self._scratch.name))
        self._fitted: tuple[GradientFeaturizer, Path] | None = None

    def fit(self, train: TrainingSet) -> None:
        """Load, or build and store, the second moment (estimate only) and the features Φ `[N, k]`."""
        self._fit(train)

    def _fit(self, train: TrainingSet) -> tuple[GradientFeaturizer, Path]:
        if self._fitted is None:
            started = time.perf_counter()
            tracked = restricted(self.model, selected_layers(self.model, self.params))
            denominator = self._denominator(tracked, train)
            featurizer = GradientFeaturizer(tracked, shared_projector(tracked.num_params, self.params, tracked.device),
                                            corrected_gradients(denominator))
            args = self._feature_arguments(featurizer, len(train))
            directory, reused = self.files.get_or_build(args.kind, args.model_dump(mode="json"),
                                                        partial(self._build_features, featurizer, train))
            self.context.extras["trackstar_features"] = "reused" if reused else "built"
            self.context.timings["trackstar_fit_s"] = time.perf_counter() - started
            self._fitted = (featurizer, directory)
        return self._fitted

    def _denominator(self, tracked: ModelAdapter, train: TrainingSet) -> Tensor:
        """`[P]` `√v + ε` from the registered optimizer state or the stored estimate."""
        if self.context.second_moment is not None:
            v = self.context.second_moment.flat(tracked)
            self.context.extras["trackstar_second_moment"] = "optimizer_state"
            default_eps = ADAM_EPS
        else:
            v = self._estimated_second_moment(tracked, train)
            self.context.extras["trackstar_second_moment"] = "estimate"
            default_eps = ESTIMATE_EPS_FRACTION * float(v.sqrt().mean())
        eps = self.params.eps if self.params.eps is not None else default_eps
        return v.sqrt() + eps

    def _estimated_second_moment(self, tracked: ModelAdapter, train: TrainingSet) -> Tensor:
        """`[P]` `(1/n) Σ_i g_i²` over the first n = min(fit_rows, N) rows, stored as a file."""
        args = SecondMomentFit.of(self.params, fingerprint=self.context.fingerprint, num_rows=len(train),
                                  layers=tracked.param_names)
        directory, _ = self.files.get_or_build(args.kind, args.model_dump(mode="json"),
                                               partial(self._build_second_moment, tracked, train))
        return torch.from_numpy(np.array(read_array(directory, "second_moment"))).to(tracked.device)

    def _build_second_moment(self, tracked: ModelAdapter, train: TrainingSet, writer: EntryWriter) -> None:
        total = torch.zeros(tracked.num_params, dtype=torch.float64, device=tracked.device)
        rows = 0
        for batch in curvature_batches(train, self.params.batch_size, self.params.fit_rows):
            check_interrupt()  # no progress reports in this loop
            grads = tracked.per_sample_grads(batch, chunk_size=gradient_chunk(tracked.num_params))
            total += grads.double().square().sum(dim=0)
            rows += len(batch)
        writer.array("second_moment", (tracked.num_params,))[:] = (total / max(rows, 1)).float().cpu().numpy()

    def _feature_arguments(self, featurizer: GradientFeaturizer, num_rows: int) -> FeaturesFit:
        moment = self.context.second_moment
        return FeaturesFit.of(self.params, fingerprint=self.context.fingerprint, num_rows=num_rows,
                              layers=featurizer.model.param_names, dim=featurizer.dim,
                              projected=featurizer.projector is not None,
                              optimizer_state_sha256=moment.digest if moment is not None else None)

    def _build_features(self, featurizer: GradientFeaturizer, train: TrainingSet, writer: EntryWriter) -> None:
        """Φ `[N, k]`: unit-normalised corrected features, streamed batch by batch into the file."""
        features = writer.array("features", (len(train), featurizer.dim))
        for start, phi in featurizer.iter_features(train, self.params.batch_size, self.context.progress):
            features[start: start + phi.shape[0]] = unit(phi).cpu().numpy()
        features.flush()

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` cosines φ(z_q)·φ(z_i) (per_sample), or `[1, N]` their mean over the queries."""
        _, directory = self._fit(train)
        started = time.perf_counter()
        query = self.query_features(queries, train)
        if not per_sample:
            query = query.mean(dim=0, keepdim=True)
        features = read_array(directory, "features")
        scores = streamed_product(query.cpu(), features, max(1, CHUNK_BYTES // features[:1].nbytes))
        self.context.timings["trackstar_query_s"] = time.perf_counter() - started
        self.context.progress(1.0)
        return scores

    def query_features(self, queries: Batch, train: TrainingSet) -> Tensor:
        """`[Q, k]` unit features φ(z_q) of each query sample (fitting on `train` first if needed)."""
        featurizer, _ = self._fit(train)
        return unit(featurizer.query_features(queries, True, self.params.batch_size))


def corrected_gradients(denominator: Tensor) -> Callable[[ModelAdapter, Batch], Tensor]:
    """`BatchGradients` giving `[B, P]` `g(z_b) ⊘ denominator` (the optimizer-corrected gradients)."""

    def gradients(model: ModelAdapter, batch: Batch) -> Tensor:
        return model.per_sample_grads(batch, chunk_size=gradient_chunk(model.num_params)) / denominator

    return gradients


@lru_cache(maxsize=4)
def shared_projector(num_params: int, params: TrackStarParams, device: torch.device) -> RandomProjector | None:
    """`make_projector`, kept across method instances: every query of a warm worker would
    otherwise redraw the same seeded P×k matrix (≈ 0.1 s for P = 4,810, k = 256)."""
    return make_projector(num_params, params, device)


def gradient_chunk(num_params: int) -> int:
    """Rows per `torch.func.vmap` call of per-sample gradients: 64 (the library default) for
    large models, up to 1,024 for small ones, where the per-call overhead dominates (a 64-64-10
    MLP: 3× less CPU per row at 1,024 than at 64)."""
    return int(min(1024, max(64, GRADIENT_CHUNK_ELEMENTS // max(num_params, 1))))
