"""`POST /v1/queries?dry_run=true`: what a query would cost, without storing or enqueuing it.

The body is validated exactly as a real POST (`query_validation.validate_query`: the same 4xx
errors, the samples checked against the model). Then the job's phases are planned
(`service.costs.plan`), each cacheable artifact is looked up where the workers store it
(Redis or the embedded file store, and the feature files) without reading it or counting a
hit, and the fitted coefficients (`service/costs/coefficients.json`) turn rows × passes
into predicted seconds and peak memory (`service.costs.model`). An identical succeeded query
means a real POST answers at once: `result_cached: true`, predicted 0 s.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from attribution.feature_files import ARGUMENTS_FILE, FeatureFiles
from attribution.methods.base import MethodParams
from attribution.structure import ModelStructure
from service.api.estimate_schemas import PhaseOut, QueryEstimate
from service.api.query_validation import validate_query
from service.api.schemas import QueryCreate
from service.artifact_store import (
    FileArtifactStore,
    RedisArtifactStore,
    artifact_fingerprint,
    artifact_store,
)
from service.costs.artifacts import ArtifactProbe, artifact_probes
from service.costs.model import COEFFICIENTS_FILE, Coefficients, CostEstimate, JobShape, estimate
from service.costs.plan import memory_sizes, plan
from service.costs.tracked import tracked_parameters
from service.db.repositories import queries as query_repo
from service.settings import Settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def coefficients(path: Path = COEFFICIENTS_FILE) -> Coefficients:
    """Fitted coefficients (`benchmarks/cost_fit.py` writes them): `COST_COEFFICIENTS`, else the committed file."""
    return Coefficients.load(path)


def estimate_query(session: Session, settings: Settings, tenant: str, body: QueryCreate,
                   idempotency_key: str | None = None) -> QueryEstimate:
    """The predicted cost of `body` as a real POST would run it now; stores nothing."""
    checked, num_samples, replayed = validate_query(session, settings, tenant, body, idempotency_key)
    model, dataset = checked.model, checked.dataset
    structure = ModelStructure.from_dict(model.structure) if model.structure is not None else None
    layers = tuple(getattr(checked.params, "layers", ()))
    shape = JobShape(
        task=model.task, num_rows=int(dataset.num_samples), num_queries=num_samples,
        num_parameters=int(model.num_parameters), per_sample=body.mode == "per_sample",
        self_influence=body.self_influence,
        kfac_supported=structure is None or structure.kfac_problem(layers) is None,
        tracked_parameters=tracked_parameters(checked.params, model.task, structure),
    )
    phases, notes = plan(checked.method, checked.params, shape)
    warm = _warm_artifacts(settings, checked.method, checked.params, shape, model.sha256, dataset.sha256,
                           structure, notes)
    fitted = coefficients(settings.cost_coefficients or COEFFICIENTS_FILE)
    predicted = estimate(phases, memory_sizes(checked.method, checked.params, shape, phases), fitted,
                         warm=warm, notes=notes)
    result_cached = query_repo.find_succeeded(session, tenant, checked.request_hash) is not None
    if replayed is not None:
        predicted = replace(predicted, notes=(*predicted.notes, f"this Idempotency-Key already names query "
                                              f"{replayed.id}: a real POST returns it instead of running again"))
    return _out(body, checked.method, checked.params_dict, shape, predicted, result_cached, fitted, replayed=replayed is not None)


def _warm_artifacts(settings: Settings, method: str, params: MethodParams, shape: JobShape, model_sha: str,
                    dataset_sha: str, structure: ModelStructure | None, notes: list[str]) -> set[str]:
    """The artifacts of the job already cached. Jobs that fan out cache per part: counted cold."""
    if shape.num_rows > settings.fanout_rows:
        notes.append(f"N = {shape.num_rows} > FANOUT_ROWS = {settings.fanout_rows}: row-separable methods run as "
                     "parts on several workers (the seconds are the total over parts); cached parts are not "
                     "looked up, the estimate counts them cold")
        return set()
    fingerprint = artifact_fingerprint(model_sha, dataset_sha, shape.task, 0, shape.num_rows)
    precisions = ["fp32"] if settings.mixed_precision == "none" else ["fp32", settings.mixed_precision]
    probes = artifact_probes(method, params, shape, fingerprint=fingerprint,
                             parameter_names=structure.parameters if structure is not None else None,
                             precisions=precisions)
    try:
        store = artifact_store(settings)
        return {name for name, found in probes.items() if any(_found(store, settings, p) for p in found)}
    except Exception as exc:  # the estimate stays useful without the cache: count everything cold
        log.warning("dry run: artifact lookup failed (%s); counting every part cold", exc.__class__.__name__)
        notes.append("the artifact cache could not be read: every part counted cold")
        return set()


def _found(store: RedisArtifactStore | FileArtifactStore, settings: Settings, probe: ArtifactProbe) -> bool:
    if probe.store_key is not None:
        return store.contains(probe.store_key)
    if probe.files_kind is not None and probe.files_arguments is not None:
        entry = FeatureFiles(settings.features_dir).entry(probe.files_kind, probe.files_arguments)
        return (entry / ARGUMENTS_FILE).is_file()
    return False


def _out(body: QueryCreate, method: str, params: dict[str, object], shape: JobShape, predicted: CostEstimate,
         result_cached: bool, fitted: Coefficients, *, replayed: bool) -> QueryEstimate:
    """The response; with nothing new to compute (a stored identical result, or an Idempotency-Key
    retry of an existing query) the seconds and rows × passes still to run are 0."""
    nothing_to_run = result_cached or replayed
    artifacts = predicted.artifacts
    cache: Literal["warm", "partial", "cold", "none"]
    if not artifacts:
        cache = "none"
    elif all(artifacts.values()):
        cache = "warm"
    elif any(artifacts.values()):
        cache = "partial"
    else:
        cache = "cold"
    notes = list(predicted.notes)
    if result_cached:
        notes.append("an identical query already succeeded: a real POST answers at once with its stored result")
    return QueryEstimate(
        method=method, params=params, mode=body.mode, self_influence=body.self_influence,
        num_rows=shape.num_rows, num_query_samples=shape.num_queries, num_parameters=shape.num_parameters,
        num_parameters_differentiated=shape.differentiated,
        predicted_seconds=0.0 if nothing_to_run else predicted.seconds,
        predicted_seconds_cold=predicted.cold_seconds, peak_memory_bytes=predicted.peak_memory_bytes,
        rows_x_passes=0 if nothing_to_run else predicted.rows_x_passes,
        rows_x_passes_cold=predicted.cold_rows_x_passes, cache=cache, warm=artifacts, result_cached=result_cached,
        passes=[PhaseOut(name=p.name, kind=p.kind.value, rows=p.rows, passes=p.passes, rows_x_passes=p.rows_x_passes,
                         artifact=p.artifact, warm=p.warm) for p in predicted.phases],
        notes=notes, coefficients=fitted.source,
    )
