"""What one job computes: load model, rows and samples, run the query's method on a row range.

`compute_scores` runs `attribution.pipeline.attribute` over rows `[row_start, row_stop)` of
a registered dataset and returns the score matrix `[Q, n]` (Q = 1 in joint and
self-influence modes). The method class and its typed params are rebuilt once from the
stored query (`method_and_params`); the artifacts it caches are keyed by
`service.artifact_store.artifact_fingerprint`, shared by the single-job, fan-out and batched paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attribution.feature_files import FeatureFiles
from attribution.interrupts import interruptible
from attribution.methods.base import AttributionMethod, FitContext, MethodParams
from attribution.methods.registry import method_class
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.stability import StabilityParams, StabilityReport, rank_stability
from loading import (
    ShardedTrainingSet,
    input_spec,
    load_model,
    load_second_moment,
    load_tokenizer,
    samples_to_batch,
)
from loading.errors import ModelLoadError
from service.artifact_store import artifact_fingerprint, artifact_store
from service.db.models import Dataset, Model, Query
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings
from workers.stopping import CheckedRows, ProgressWriter


@dataclass
class Computed:
    scores: Tensor  # [Q, n] float32 on CPU
    train: ShardedTrainingSet
    timings: dict[str, float]
    extras: dict[str, Any]
    stability: StabilityReport | None = None  # when the query asked for rank stability


def method_and_params(query: Query) -> tuple[type[AttributionMethod], MethodParams]:
    """The query's method class and its typed params, rebuilt from the stored (resolved) dict;
    raises `ValueError` (`UnknownMethodError`, `ParamsError`) naming the problem."""
    cls = method_class(query.method)
    return cls, cls.params_type.parse(query.params or {})


def amp_dtype(settings: Settings, model: ModelAdapter) -> torch.dtype | None:
    if model.device.type != "cuda" or settings.mixed_precision == "none":
        return None
    return torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float16


def compute_scores(
    query: Query, model_row: Model, dataset_row: Dataset, settings: Settings, *,
    row_start: int, row_stop: int, progress: ProgressWriter,
) -> Computed:
    """Scores `[Q, row_stop - row_start]` of the query's method on that row range. The method
    reads the rows through `CheckedRows` and runs `interruptible`, so `progress.check()` can
    stop it at any training batch or solver/unlearning iteration."""
    started = time.perf_counter()
    model = load_model(model_row, settings)
    spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
    train = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, row_start=row_start, row_stop=row_stop)
    cls, params = method_and_params(query)
    inputs = params.context_inputs()
    with session_scope(settings) as session:
        queries = None if query.self_influence else samples_to_batch(
            query.samples or {}, model_row=model_row, model=model, settings=settings, session=session)
        checkpoints = _checkpoints(session, query, list(inputs.checkpoint_model_ids), settings)
    context = FitContext(
        fingerprint=artifact_fingerprint(model_row.sha256, dataset_row.sha256, model_row.task, row_start, row_stop),
        store=artifact_store(settings), progress=progress, amp_dtype=amp_dtype(settings, model),
        checkpoints=checkpoints, checkpoint_lrs=list(inputs.checkpoint_lrs),
        feature_files=FeatureFiles(settings.features_dir),
        second_moment=load_second_moment(inputs.optimizer_state, settings.data_root) if inputs.optimizer_state else None,
    )
    context.timings["load_s"] = time.perf_counter() - started
    stability = StabilityParams.parse(query.stability) if query.stability else None
    share = 1.0 / (1 + stability.resamples) if stability is not None else 1.0  # of the progress bar
    if stability is not None:
        context.progress = lambda fraction: progress(share * fraction)
    fitted: list[AttributionMethod] = []
    rows = CheckedRows(train, progress.check)
    per_sample, self_influence = query.mode == "per_sample", bool(query.self_influence)
    with interruptible(progress.check):
        scores = attribute(model, cls, params, rows, context, queries=queries, per_sample=per_sample,
                           self_influence=self_influence, on_fitted=fitted.append)
    scores = scores.detach().float().cpu()
    report = None
    if stability is not None:
        resampled_at = time.perf_counter()
        with interruptible(progress.check):
            report = rank_stability(fitted[0], scores, rows, stability, queries=queries, k=int(query.top_k),
                                    per_sample=per_sample, self_influence=self_influence, offset=train.row_start,
                                    progress=lambda fraction: progress(share + (1 - share) * fraction))
        context.extras["stability"] = report.summary()
        context.timings["stability_s"] = time.perf_counter() - resampled_at
    context.extras.update(train.text_extras())
    context.timings["total_s"] = time.perf_counter() - started
    return Computed(scores, train, dict(context.timings), dict(context.extras), report)


def _checkpoints(session: Any, query: Query, ids: list[str], settings: Settings) -> list[ModelAdapter]:
    """Registered checkpoint models θ_c of the query's tenant, in the given order."""
    if not ids:
        return []
    found = repo.tenant_models(session, query.tenant, ids)
    missing = [i for i in ids if i not in found]
    if missing:
        raise ModelLoadError("params.checkpoint_model_ids", f"unknown model {missing[0]}")
    return [load_model(found[i], settings) for i in ids]
