"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale"), eq. (16)–(17).

For a classifier the model output function is the correct-class margin

    f(z; θ) = log(p / (1 − p)) = ℓ_y − log Σ_{j≠y} exp(ℓ_j)        (ℓ the logits)

and its per-sample gradient, randomly projected to k dims, is the feature
`φ(z) = ∇_θ f(z; θ) R ∈ ℝ^k`. With `Φ = [φ(z_1); …; φ(z_N)] ∈ ℝ^{N×k}` and the loss
weighting `Q = diag(1 − p_i)` (∂L/∂f = −(1 − p) for cross-entropy), one model's scores are

    τ(z_q)_i = φ(z_q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(z_i) · (1 − p_i).

An ensemble of checkpoints θ_c (`FitContext.checkpoints`; none: the final model) averages
the per-model scores, `τ = (1/C) Σ_c τ_c` (the paper averages the two factors separately
and then soft-thresholds; for one model the two agree, and we keep every score dense).
Checkpoint learning rates play no role: TRAK's checkpoints are an ensemble, not a path.

Regression and language-model tasks (and `use_margin=False`) use the per-sample loss
gradient as the feature and Q = I; the loss gradient of a classifier already carries the
weight, `∇L = −(1 − p) ∇f`.

Two phases: `fit` featurizes the training set once per checkpoint and stores
`X = Q Φ (ΦᵀΦ + λI)⁻¹` `[N, k]` and the self-influence `[N]` in the artifact store
(keyed by fingerprint, checkpoint digest and every fit param), so any later query —
from this or another instance on the same store — is one projected query gradient and a
`[Q, k] × [k, N]` product. Self-influence: `φ_iᵀ (ΦᵀΦ + λI)⁻¹ φ_i (1 − p_i)`.

The projection defaults to k = 2048; when k ≥ P (small models) the features are the raw
gradients: a projection to ≥ P dims costs more and only perturbs the kernel, while the
unprojected kernel is the exact Gauss–Newton one TRAK approximates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import torch
from pydantic import StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor

from attribution.artifacts import FitArgs, artifact_key, cached_tensors
from attribution.data import Batch, TrainingSet
from attribution.methods.base import (
    PARAMS_CONFIG,
    AttributionMethod,
    FitContext,
    MethodName,
    Normalize,
    ParamsError,
    Progress,
    stage_progress,
)
from attribution.methods.gradient_features import (
    MAX_PROJECTION_DIM,
    CheckpointFeatureParams,
    GradientFeaturizer,
    checkpoint_featurizers,
    loss_gradients,
)
from attribution.methods.registry import register
from attribution.model import ModelAdapter
from attribution.tasks import ClassificationTask

MARGIN_CHUNK = 64


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class TrakParams(CheckpointFeatureParams):
    """`projection_dim` k (default 2048; `None` or ≥ P: raw gradients), `projection_type`,
    `damping` λ added to ΦᵀΦ, `use_margin` (classification: margin features with the
    (1 − p) weighting; false: loss-gradient features), plus `layers` / `last_layer` and the
    ensemble's `checkpoint_model_ids` (`checkpoint_lrs` are accepted and play no role).
    `normalize` defaults to "relative" (benchmarks/results/q3_leakage.md, fair protocol)."""

    normalize: Normalize = Normalize.RELATIVE

    projection_dim: StrictInt | None = 2048
    damping: StrictFloat = 1e-2
    use_margin: StrictBool = True

    def check(self) -> None:
        super().check()
        if not self.damping > 0:
            raise ParamsError("damping", "must be positive (ΦᵀΦ is singular when k > N)")


def correct_class_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """`[B]` `log(p_y / (1 − p_y)) = ℓ_y − logsumexp_{j≠y} ℓ_j` from `[B, C]` logits."""
    logits = logits.reshape(logits.shape[0], -1).float()
    labels = targets.long().reshape(-1, 1)
    correct = logits.gather(1, labels).squeeze(1)
    others = logits.scatter(1, labels, float("-inf")).logsumexp(dim=1)
    return correct - others


def margin_gradients(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, P]` per-sample gradients `∇_θ f(z_b; θ)` of the correct-class margin.

    Batched autograd with one-hot output gradients (`is_grads_batched`), which works for
    eager and TorchScript modules alike.
    """
    params = model.live_params()
    parts = []
    for start in range(0, len(batch), MARGIN_CHUNK):
        chunk = batch.slice(start, start + MARGIN_CHUNK).to(model.device)
        margin = correct_class_margin(model.task.forward(model.module, chunk.inputs), chunk.targets)
        eye = torch.eye(len(chunk), device=margin.device, dtype=margin.dtype)
        grads = torch.autograd.grad(margin, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        parts.append(torch.cat([
            (g if g is not None else torch.zeros(len(chunk), *p.shape, device=p.device)).reshape(len(chunk), -1)
            for g, p in zip(grads, params, strict=True)
        ], dim=1).detach())
    return torch.cat(parts) if parts else torch.empty(0, model.num_params, device=model.device)


class TrakFit(FitArgs):
    """What one checkpoint's TRAK artifacts depend on besides model and data: the feature
    dimension k, projection type, whether projected, seed, damping λ, margin output, tracked
    parameter names, the checkpoint ("final" or its digest) and the row count."""

    kind = "trak"
    projection_dim: int
    projection_type: str
    projected: bool
    seed: int
    damping: float
    margin: bool
    layers: list[str]
    checkpoint: str
    num_rows: int

    @classmethod
    def of(cls, params: TrakParams, *, dim: int, projected: bool, margin: bool, layers: Sequence[str],
           checkpoint: str, num_rows: int) -> TrakFit:
        return cls(projection_dim=dim, projection_type=params.projection_type.value, projected=projected,
                   seed=params.seed, damping=params.damping, margin=margin, layers=list(layers),
                   checkpoint=checkpoint, num_rows=num_rows)


@register
class Trak(AttributionMethod):
    """TRAK scores from cached per-checkpoint kernel features (see module docstring)."""

    name = MethodName.TRAK
    params_type = TrakParams
    params: TrakParams

    def __init__(self, model: ModelAdapter, params: TrakParams, context: FitContext) -> None:
        super().__init__(model, params, context)
        self._loaded: dict[str, dict[str, Tensor]] = {}  # artifact key → tensors on the model's device

    @property
    def _uses_margin(self) -> bool:
        return self.params.use_margin and isinstance(self.model.task, ClassificationTask)

    def _featurizers(self) -> list[GradientFeaturizer]:
        gradients = margin_gradients if self._uses_margin else loss_gradients
        return [f for f, _ in checkpoint_featurizers(self.model, self.context, self.params, gradients)]

    def fit(self, train: TrainingSet) -> None:
        """Load or compute, per checkpoint, `X = QΦ(ΦᵀΦ+λI)⁻¹` `[N, k]` and self-influence `[N]`."""
        self._fitted(self._featurizers(), train)

    def _fitted(self, featurizers: list[GradientFeaturizer], train: TrainingSet) -> list[dict[str, Tensor]]:
        """Per-checkpoint artifacts: from this instance, else the store, else computed (and stored).

        The key names the dataset by the context fingerprint and row count, as the store does.
        """
        started = time.perf_counter()
        artifacts = []
        for stage, featurizer in enumerate(featurizers):
            args = self._fit_args(featurizer, len(train))
            key = artifact_key(self.context.fingerprint, args)
            if key not in self._loaded:
                progress = stage_progress(self.context.progress, stage, len(featurizers))
                compute = partial(self._featurize, featurizer, train, progress)
                tensors = cached_tensors(self.context.store, self.context.fingerprint, args, compute)
                self._loaded[key] = {k: v.to(featurizer.model.device) for k, v in tensors.items()}
                self.context.timings["trak_fit_s"] = time.perf_counter() - started
            artifacts.append(self._loaded[key])
        return artifacts

    def _fit_args(self, featurizer: GradientFeaturizer, num_rows: int) -> TrakFit:
        checkpoint = "final" if featurizer.model.module is self.model.module else featurizer.model.digest()
        return TrakFit.of(self.params, dim=featurizer.dim, projected=featurizer.projector is not None,
                          margin=self._uses_margin, layers=featurizer.model.param_names, checkpoint=checkpoint,
                          num_rows=num_rows)

    def _featurize(self, featurizer: GradientFeaturizer, train: TrainingSet, progress: Progress) -> dict[str, Tensor]:
        """`{"weighted_features": X [N, k], "self_influence": [N], "relative_norm_sq": [N]}` for one checkpoint.

        `relative_norm_sq_i = w_i² φ_iᵀ(ΦᵀΦ+λI)⁻¹φ_i`: the squared norm, in the kernel's geometry,
        of row i's side `w_i φ_i` of the score `φ_qᵀ(ΦᵀΦ+λI)⁻¹(w_i φ_i)` (see `relative_norm_squared`).
        """
        if featurizer.dim > MAX_PROJECTION_DIM:
            raise ValueError(f"TRAK needs a k×k kernel; P={featurizer.dim} is too large to use unprojected, "
                             f"set projection_dim ≤ {MAX_PROJECTION_DIM}")
        device = featurizer.model.device
        features = torch.empty(len(train), featurizer.dim, device=device)
        gram = torch.zeros(featurizer.dim, featurizer.dim, dtype=torch.float64, device=device)
        for start, phi in featurizer.iter_features(train, self.params.batch_size, progress):
            features[start: start + phi.shape[0]] = phi
            gram += phi.double().T @ phi.double()
        gram.diagonal().add_(self.params.damping)
        kernel = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        weights = self._loss_weights(featurizer.model, train).to(device=device, dtype=torch.float64)
        self_influence = torch.empty(len(train), dtype=torch.float64, device=device)
        for start in range(0, len(train), self.params.batch_size):  # in place, O(batch·k) extra memory
            rows = features[start: start + self.params.batch_size].double()
            weighted = (rows @ kernel) * weights[start: start + rows.shape[0], None]
            self_influence[start: start + rows.shape[0]] = (weighted * rows).sum(dim=1)
            features[start: start + rows.shape[0]] = weighted.float()
        return {"weighted_features": features, "self_influence": self_influence.float(),
                "relative_norm_sq": (self_influence * weights).float()}

    def _loss_weights(self, model: ModelAdapter, train: TrainingSet) -> Tensor:
        """`[N]` Q's diagonal: `1 − p_i = 1 − exp(−L_i)` for margin features, else 1."""
        if not self._uses_margin:
            return torch.ones(len(train))
        return -torch.expm1(-model.losses(train, self.params.batch_size))

    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint: mean query feature) `(1/C) Σ_c τ_c(z_q)`."""
        featurizers = self._featurizers()
        artifacts = self._fitted(featurizers, train)
        started = time.perf_counter()
        total = torch.zeros(len(queries) if per_sample else 1, len(train), dtype=torch.float32)
        for featurizer, artifact in zip(featurizers, artifacts, strict=True):
            query = featurizer.query_features(queries, per_sample, self.params.batch_size)
            total += (query @ artifact["weighted_features"].T).cpu()
        self.context.timings["trak_score_s"] = time.perf_counter() - started
        self.context.progress(1.0)
        return total / len(featurizers)

    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]` `(1/C) Σ_c φ_iᵀ(ΦᵀΦ+λI)⁻¹φ_i (1 − p_i)`."""
        artifacts = self._fitted(self._featurizers(), train)
        return torch.stack([a["self_influence"].cpu() for a in artifacts]).mean(dim=0)

    def relative_norm_squared(self, train: TrainingSet) -> Tensor:
        """`[N]` `(1/C) Σ_c w_ci² φ_ciᵀ(ΦᵀΦ+λI)⁻¹φ_ci`, w = 1 − p.

        TRAK's score weights only the training side by `w_i`, so `sqrt(self-influence)`
        (one factor of `w_i`) is not the row's norm in the score's geometry and RelatIF's
        Cauchy–Schwarz guarantee (an exact copy of the query ranks first) fails; measured on
        the digits leakage fixture: 19/20 copies first with self-influence, 20/20 with this.
        """
        artifacts = self._fitted(self._featurizers(), train)
        return torch.stack([a["relative_norm_sq"].cpu() for a in artifacts]).mean(dim=0)
