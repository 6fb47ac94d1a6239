"""Where each cacheable part of a job (`service.costs.plan` artifacts) would be found.

`artifact_probes` rebuilds, without loading the model, the keys the methods store their
artifacts under — `artifact_key(...)` in the artifact store, or `FeatureFiles` entries — from
the job's fingerprint, the model's trainable parameter names (recorded at registration) and the
params, with the methods' own fit-argument models (`forward_inf.BaseLosses` / `BaseLogLosses`,
`pipeline.SelfInfluenceFit` / `RelativeNormFit`, `influence.IHVPFit` / `CurvatureTrace`,
`trak.TrakFit`, `trackstar.FeaturesFit` / `SecondMomentFit`). A part
whose key cannot be known before the run (checkpoint models, `last_layer`, `auto`, float64
copies, Newton unlearning) gets no probe and counts as cold. `tests/service/test_dry_run.py`
runs real queries and checks that these probes then find what the methods stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attribution.artifacts import artifact_key
from attribution.ihvp import IHVPName
from attribution.methods.base import MethodName, MethodParams
from attribution.methods.forward_inf import BaseLogLosses, BaseLosses
from attribution.methods.forward_inf_params import ForwardInfParams, Precision
from attribution.methods.gradient_features import CheckpointFeatureParams, GradientFeatureParams
from attribution.methods.influence import CurvatureTrace, IHVPChoice, IHVPFit, IHVPParams
from attribution.methods.trackstar import FeaturesFit, SecondMomentFit, TrackStarParams
from attribution.methods.trak import TrakFit, TrakParams
from attribution.pipeline import RelativeNormFit, SelfInfluenceFit
from service.costs.model import JobShape
from service.costs.plan import resolve_ihvp


@dataclass(frozen=True)
class ArtifactProbe:
    """An artifact's address: a key of the artifact store, or a `FeatureFiles` (kind, arguments) entry."""

    store_key: str | None = None
    files_kind: str | None = None
    files_arguments: dict[str, Any] | None = None


def artifact_probes(method: str, params: MethodParams, shape: JobShape, *, fingerprint: str,
                    parameter_names: Sequence[str] | None, precisions: Sequence[str] = ("fp32",),
                    ) -> dict[str, list[ArtifactProbe]]:
    """`{artifact: probes}`: the artifact is warm when any probe finds it (one per precision a
    worker may sweep in). `parameter_names`: the model's trainable parameters (None: unknown)."""
    out: dict[str, list[ArtifactProbe]] = {}
    try:
        name = MethodName(method)
    except ValueError:
        return out
    params = params.for_task(shape.task)  # e.g. TracIn's last layer on classifiers: what runs
    names = _tracked_names(params, parameter_names)
    if isinstance(params, ForwardInfParams):
        p = params.for_task(shape.task).resolved()
        if p.precision != Precision.FP32:
            return out
        out["base_losses"] = [ArtifactProbe(artifact_key(fingerprint, BaseLosses(precision=tag))) for tag in precisions]
        out["base_log_losses"] = [ArtifactProbe(artifact_key(fingerprint, BaseLogLosses(precision=tag)))
                                  for tag in precisions]
        if not p.auto and not p.newton:
            out.update(_self_influence_probes(name, p, fingerprint))
        return out
    if isinstance(params, CheckpointFeatureParams) and params.checkpoint_model_ids:
        return out  # checkpoint digests are known only once the models load
    if name in (MethodName.INFLUENCE, MethodName.TRACIN, MethodName.GRADIENT_SIMILARITY):
        out.update(_self_influence_probes(name, params, fingerprint))
    if isinstance(params, IHVPParams) and names is not None and name is not MethodName.FORWARD_INF:
        out.update(_ihvp_probes(params, shape, fingerprint, names))
    if isinstance(params, TrakParams) and names is not None:
        out["trak_features"] = [ArtifactProbe(_trak_key(params, shape, fingerprint, names))]
    if isinstance(params, TrackStarParams) and names is not None and params.optimizer_state is None:
        out.update(_trackstar_probes(params, shape, fingerprint, names))
    return out


def _tracked_names(params: MethodParams, names: Sequence[str] | None) -> list[str] | None:
    """The parameter names a method tracks (`layers` prefixes); None when unknown."""
    if names is None or (isinstance(params, GradientFeatureParams) and params.last_layer):
        return None
    layers = tuple(getattr(params, "layers", ()))
    if not layers:
        return list(names)
    return [n for n in names if any(n == prefix or n.startswith(f"{prefix}.") for prefix in layers)]


def _self_influence_probes(name: MethodName, params: MethodParams, fingerprint: str) -> dict[str, list[ArtifactProbe]]:
    """`pipeline.cached_self_influence` keys (no checkpoints: empty digests and rates)."""
    return {args.kind: [ArtifactProbe(artifact_key(fingerprint, args))]
            for args in (RelativeNormFit.of(name, params, [], []), SelfInfluenceFit.of(name, params, [], []))}


def _ihvp_probes(params: IHVPParams, shape: JobShape, fingerprint: str,
                 names: list[str]) -> dict[str, list[ArtifactProbe]]:
    ihvp = resolve_ihvp(params, shape)
    if ihvp is IHVPChoice.AUTO:
        return {}
    return {
        "ihvp_fit": [ArtifactProbe(artifact_key(fingerprint, IHVPFit.of(params, IHVPName(ihvp.value), names)))],
        "curvature_trace": [ArtifactProbe(artifact_key(fingerprint, CurvatureTrace.of(params, names)))],
    }


def _feature_dim(params: GradientFeatureParams, size: int) -> tuple[int, bool]:
    k = params.projection_dim
    projected = k is not None and k < size
    return (int(k) if projected and k is not None else size), projected


def _trak_key(params: TrakParams, shape: JobShape, fingerprint: str, names: list[str]) -> str:
    dim, projected = _feature_dim(params, shape.differentiated)
    margin = params.use_margin and shape.task == "classification"
    return artifact_key(fingerprint, TrakFit.of(params, dim=dim, projected=projected, margin=margin, layers=names,
                                                checkpoint="final", num_rows=shape.num_rows))


def _trackstar_probes(params: TrackStarParams, shape: JobShape, fingerprint: str,
                      names: list[str]) -> dict[str, list[ArtifactProbe]]:
    dim, projected = _feature_dim(params, shape.differentiated)
    features = FeaturesFit.of(params, fingerprint=fingerprint, num_rows=shape.num_rows, layers=names, dim=dim,
                              projected=projected, optimizer_state_sha256=None)
    moment = SecondMomentFit.of(params, fingerprint=fingerprint, num_rows=shape.num_rows, layers=names)
    return {"trackstar_features": [ArtifactProbe(files_kind=features.kind, files_arguments=features.model_dump(mode="json"))],
            "trackstar_second_moment": [ArtifactProbe(files_kind=moment.kind, files_arguments=moment.model_dump(mode="json"))]}

