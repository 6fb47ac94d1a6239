"""Shared machinery of the gradient-feature methods (TracIn, TRAK, gradient similarity).

A *gradient feature* of a row z is `g(z) = ∇_θ L(θ, z)` restricted to some layers and
optionally randomly projected (`attribution.projection`): `φ(z) = g(z) R ∈ ℝ^k`. The
methods differ only in how they combine query and training features, so this module
owns the common parts: the params every one of them takes (layers, last layer,
projection; checkpoint ids and learning rates for TracIn and TRAK), resolving those
params against a model, and streaming features
over a training set with progress reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.methods.base import (
    PARAMS_CONFIG,
    ContextInputs,
    FitContext,
    MethodParams,
    ParamsError,
    Progress,
)
from attribution.methods.checkpoints import (
    check_checkpoint_context,
    check_checkpoint_params,
    checkpoint_schedule,
)
from attribution.model import ModelAdapter
from attribution.projection import ProjectionType, RandomProjector

MAX_PROJECTION_DIM = 1 << 16

# `[B, P]` per-sample gradients of one batch at one model.
BatchGradients = Callable[[ModelAdapter, Batch], Tensor]


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class GradientFeatureParams(MethodParams):
    """Which gradients form the features, and how they are compressed.

    `layers`: parameter-name prefixes to keep (e.g. `["fc2"]`); empty keeps every trainable
    parameter. `last_layer`: keep only the last parameterised layer (the module owning the
    last entry of `named_parameters()`); exclusive with `layers`. `projection_dim`: project
    features to k dims with a `projection_type` matrix seeded by `seed`; `None`, or any
    k ≥ P, means no projection (a projection to ≥ P dims saves nothing and only adds noise).
    """

    layers: tuple[StrictStr, ...] = ()
    last_layer: StrictBool = False
    projection_dim: StrictInt | None = None
    projection_type: ProjectionType = ProjectionType.RADEMACHER

    def check(self) -> None:
        if self.last_layer and self.layers:
            raise ParamsError("layers", "give either layers or last_layer, not both")
        if any(not name for name in self.layers):
            raise ParamsError("layers", "layer names must be non-empty")
        if self.projection_dim is not None and not 1 <= self.projection_dim <= MAX_PROJECTION_DIM:
            raise ParamsError("projection_dim", f"must be between 1 and {MAX_PROJECTION_DIM}")


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class CheckpointFeatureParams(GradientFeatureParams):
    """Gradient-feature params of the methods that sum or average over checkpoints θ_c
    (TracIn, TRAK).

    `checkpoint_model_ids`: ids of registered models of the same architecture; resolved by
    the service into `FitContext.checkpoints` (in this order). `checkpoint_lrs`: their
    learning rates η_c (finite, > 0; one per id; empty: η_c = 1). No ids: the final model only.
    """

    checkpoint_model_ids: tuple[StrictStr, ...] = ()
    checkpoint_lrs: tuple[StrictFloat, ...] = ()

    def check(self) -> None:
        super().check()
        check_checkpoint_params(self.checkpoint_model_ids, self.checkpoint_lrs)

    def context_inputs(self) -> ContextInputs:
        return ContextInputs(checkpoint_model_ids=self.checkpoint_model_ids, checkpoint_lrs=self.checkpoint_lrs)

    def check_context(self, context: FitContext) -> None:
        """The context must hold the checkpoints the params name (the service resolves them)."""
        check_checkpoint_context(self.checkpoint_model_ids, self.checkpoint_lrs, context)


def last_layer_prefix(model: ModelAdapter) -> str | None:
    """Name of the module owning the last trainable parameter (`"2"` for `"2.weight"`).

    `None` when that parameter belongs to the root module (e.g. a bare `nn.Linear`), in
    which case the last layer is the whole model.
    """
    return _last_owner([n for n, p in model.module.named_parameters() if p.requires_grad])


def _last_owner(names: Sequence[str]) -> str | None:
    if not names:
        raise ValueError("the model has no trainable parameter")
    owner, _, _ = names[-1].rpartition(".")
    return owner or None


def requested_layers(params: GradientFeatureParams, names: Sequence[str]) -> list[str] | None:
    """Layer prefixes the params ask for on a model whose trainable parameters are `names`, in
    order (`None`: no restriction). Needs only the names, so a registered model's recorded
    structure answers it before loading (the cost estimate's differentiated parameters)."""
    if params.layers:
        return list(params.layers)
    if params.last_layer:
        prefix = _last_owner(names)
        return [prefix] if prefix is not None else None
    return None


def selected_layers(model: ModelAdapter, params: GradientFeatureParams) -> list[str] | None:
    """Layer prefixes the params ask for on this model (`None`: every tracked parameter)."""
    requested = requested_layers(params, [n for n, p in model.module.named_parameters() if p.requires_grad])
    return requested if requested is not None else model.layers


def restricted(model: ModelAdapter, layers: list[str] | None) -> ModelAdapter:
    """The same module (shared, not copied) tracking only `layers`."""
    if layers == model.layers:
        return model
    return ModelAdapter(model.module, model.task, device=model.device, layers=layers)


def loss_gradients(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, P]` per-sample loss gradients `∇_θ L(θ, z_b)` (the default `BatchGradients`)."""
    return model.per_sample_grads(batch)


def make_projector(num_params: int, params: GradientFeatureParams, device: torch.device) -> RandomProjector | None:
    """The params' projection `ℝ^P → ℝ^k`, or `None` when there is none or k ≥ P."""
    if params.projection_dim is None or params.projection_dim >= num_params:
        return None
    return RandomProjector(num_params, params.projection_dim, seed=params.seed,
                           kind=params.projection_type, device=device)


class GradientFeaturizer:
    """Features `φ(z) = g(z) R` of one model: per-sample gradients of the model's tracked
    parameters, projected by `projector` (`None`: the raw gradients).

    `gradients` computes the raw `[B, P]` gradients (loss gradients by default; TRAK
    passes the margin gradient).
    """

    def __init__(
        self,
        model: ModelAdapter,
        projector: RandomProjector | None,
        gradients: BatchGradients = loss_gradients,
    ) -> None:
        if projector is not None and projector.input_dim != model.num_params:
            raise ValueError(f"projector expects P={projector.input_dim}, the model tracks {model.num_params}")
        self.model = model
        self.projector = projector
        self.gradients = gradients

    @classmethod
    def for_params(
        cls, model: ModelAdapter, params: GradientFeatureParams, gradients: BatchGradients = loss_gradients
    ) -> GradientFeaturizer:
        """The featurizer the params ask for on one model (layers selected, projection built)."""
        tracked = restricted(model, selected_layers(model, params))
        return cls(tracked, make_projector(tracked.num_params, params, tracked.device), gradients)

    @property
    def dim(self) -> int:
        """k, the feature dimension (P when not projected)."""
        return self.projector.output_dim if self.projector is not None else self.model.num_params

    def features(self, batch: Batch) -> Tensor:
        """`[B, k]` float32 features of a batch, on the model's device."""
        return self.project(self.gradients(self.model, batch))

    def project(self, grads: Tensor) -> Tensor:
        """`[B, P]` gradients → `[B, k]` float32 features."""
        grads = grads.float()
        return self.projector.project(grads) if self.projector is not None else grads

    def mean_feature(self, batch: Batch, chunk_size: int) -> Tensor:
        """`[1, k]` mean feature of a batch, `(1/B) Σ_b φ(z_b)` — for loss gradients the
        (projected) gradient of the mean loss — in chunks so memory stays O(chunk·P)."""
        if len(batch) == 0:
            raise ValueError("the query batch is empty")
        total = torch.zeros(1, self.dim, device=self.model.device)
        for start in range(0, len(batch), chunk_size):
            total += self.features(batch.slice(start, start + chunk_size)).sum(dim=0, keepdim=True)
        return total / len(batch)

    def query_features(self, queries: Batch, per_sample: bool, chunk_size: int) -> Tensor:
        """`[Q, k]` per-sample query features, or `[1, k]` their mean (joint mode)."""
        if len(queries) == 0:
            raise ValueError("the query batch is empty")
        if per_sample:
            return torch.cat([self.features(queries.slice(s, s + chunk_size))
                              for s in range(0, len(queries), chunk_size)])
        return self.mean_feature(queries, chunk_size)

    def iter_features(
        self, train: TrainingSet, batch_size: int, progress: Progress | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """`(start, [b, k])` features over a training set in row order; `progress(fraction)`."""
        total = max(len(train), 1)
        for start, batch in train.batches(batch_size):
            yield start, self.features(batch)
            if progress is not None:
                progress(min((start + len(batch)) / total, 1.0))


def checkpoint_featurizers(
    model: ModelAdapter,
    context: FitContext,
    params: GradientFeatureParams,
    gradients: BatchGradients = loss_gradients,
) -> list[tuple[GradientFeaturizer, float]]:
    """`[(featurizer of θ_c, η_c)]` over the checkpoint schedule, all tracking the layers
    the params select on the final model, with one shared projection (same seed)."""
    if isinstance(params, CheckpointFeatureParams):
        params.check_context(context)
    layers = selected_layers(model, params)
    schedule = [(restricted(ckpt, layers), lr) for ckpt, lr in checkpoint_schedule(model, context)]
    sizes = {ckpt.num_params for ckpt, _ in schedule}
    if len(sizes) != 1:
        raise ValueError(f"checkpoints track different parameter counts {sorted(sizes)}; same architecture required")
    first = schedule[0][0]
    projector = make_projector(first.num_params, params, first.device)
    return [(GradientFeaturizer(ckpt, projector, gradients), lr) for ckpt, lr in schedule]

def dot_scores(
    featurizer: GradientFeaturizer,
    query: Tensor,
    train: TrainingSet,
    batch_size: int,
    progress: Progress | None = None,
    *,
    unit_rows: bool = False,
) -> Tensor:
    """`[Q, N]` CPU float32 `query · φ(z_i)` for every training row, streamed in batches.

    `unit_rows` divides each training feature by its norm first (cosine similarity when
    `query` rows are unit too); a zero feature then scores 0.
    """
    out = torch.empty(query.shape[0], len(train), dtype=torch.float32)
    for start, phi in featurizer.iter_features(train, batch_size, progress):
        if unit_rows:
            phi = unit(phi)
        out[:, start: start + phi.shape[0]] = (query @ phi.T).cpu()
    return out


def squared_norms(
    featurizer: GradientFeaturizer, train: TrainingSet, batch_size: int, progress: Progress | None = None
) -> Tensor:
    """`[N]` CPU float32 `‖φ(z_i)‖²` for every training row."""
    out = torch.empty(len(train), dtype=torch.float32)
    for start, phi in featurizer.iter_features(train, batch_size, progress):
        out[start: start + phi.shape[0]] = phi.square().sum(dim=1).cpu()
    return out


def unit(rows: Tensor) -> Tensor:
    """`[B, k]` rows divided by their L2 norm (zero rows stay zero). Each row is first divided by its
    largest magnitude, so rows whose squares underflow (entries below ~1e-19 in float32) keep their
    direction."""
    peak = rows.abs().amax(dim=1, keepdim=True)
    scaled = torch.where(peak > 0, rows / peak.clamp_min(torch.finfo(rows.dtype).tiny), rows)
    norms = scaled.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, scaled / norms.clamp_min(torch.finfo(rows.dtype).tiny), rows)
