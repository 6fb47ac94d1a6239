"""One entry point for every method: construct, fit, score, normalise.

    attribute(model, "forward_inf", {"steps": 5, "lr": 0.01}, train, context, queries=batch)
        → [1, N] scores (joint), [Q, N] with per_sample=True, [1, N] self-influence with
          self_influence=True (no queries).

Relative normalisation (RelatIF, Barshan et al. 2020, eq. 5 with the self-influence
normaliser): when `params.normalize == "relative"`,

    score_rel(q, i) = score(q, i) / sqrt(max(s_i, ε)),    s_i = self-influence of row i,

which removes the dominance of rows with large gradients (for gradient-dot-product scores
gᵢᵀg_q / ‖gᵢ‖ ≤ ‖g_q‖ by Cauchy–Schwarz, with equality for an exact copy). The floor
ε = max(1e-12, 1e-6 · median|s|) keeps rows whose self-influence is at rounding level from
being amplified without bound. The vector s `[N]` depends on (model, dataset, method,
params except `normalize`): it is computed once and cached in the artifact store.

`method="auto"` (`attribution.methods.auto`) resolves, from the model's task and size, the
purpose (`self_influence`) and the context's checkpoints, to a concrete method and params,
runs that, and reports the choice in `context.extras["auto"]` (method, params with defaults
filled in, reason).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import torch
from torch import Tensor

from attribution.artifacts import FitArgs, cached_tensors
from attribution.data import Batch, TrainingSet
from attribution.methods.auto import AUTO, AutoInputs, AutoParams, choose_method
from attribution.methods.base import (
    AttributionMethod,
    BatchedScores,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
)
from attribution.methods.registry import method_class
from attribution.model import ModelAdapter

RELATIVE_FLOOR = 1e-6  # ε as a fraction of the median |self-influence|
ABSOLUTE_FLOOR = 1e-12


def attribute(
    model: ModelAdapter,
    method: str | MethodName | type[AttributionMethod],
    params: MethodParams | Mapping[str, Any] | None,
    train: TrainingSet,
    context: FitContext,
    *,
    queries: Batch | None,
    per_sample: bool = False,
    self_influence: bool = False,
    on_fitted: Callable[[AttributionMethod], None] | None = None,
) -> Tensor:
    """Scores of every training row: `[1, N]` (joint), `[Q, N]` (per_sample), `[1, N]` (self-influence).

    `method` is a registered name or an `AttributionMethod` subclass; `params` its params
    dataclass or a raw mapping (validated with the method's `parse`). Raises
    `ValueError` (incl. `ParamsError`, `UnknownMethodError`) for invalid requests. `"auto"`:
    see `resolve_auto`; its choice is reported in `context.extras["auto"]`.
    `on_fitted` receives the fitted method instance (its resolved params and context), e.g. for
    `attribution.stability` to resample around the reported run.
    """
    if isinstance(method, str) and method == AUTO:
        method, params = resolve_auto(model, params, context, self_influence=self_influence)
    cls = method if isinstance(method, type) else method_class(str(method))
    if params is None or isinstance(params, Mapping):
        params = cls.params_type.parse(params)
    if not isinstance(params, cls.params_type):
        raise ValueError(f"{cls.name} takes {cls.params_type.__name__}, got {type(params).__name__}")
    _check_request(cls, train, queries, per_sample, self_influence)

    instance = cls(model, params, context)
    instance.fit(train)
    if on_fitted is not None:
        on_fitted(instance)
    effective = instance.params  # a method may resolve settings in fit (Forward-INF auto)
    relative = effective.normalize == Normalize.RELATIVE
    if relative and not cls.supports_self_influence:
        raise ValueError(f"normalize='relative' needs self-influence, which {cls.name} does not define")

    if self_influence:
        return cached_self_influence(instance, train).unsqueeze(0)
    if queries is None:  # checked above; narrows the type
        raise ValueError("queries are required unless self_influence=True")
    scores = instance.score(queries, train, per_sample=per_sample)
    if relative:
        norms = cached_self_influence(instance, train, relative_norm=True)
        scores = relative_scores(scores, norms, floor=instance.relative_norm_floor())
        if scores.dtype == torch.float64 and model.live_params()[0].dtype != torch.float64:
            scores = scores.float()  # float64 only carried memorised rows' tiny loss changes to the division
    return scores


def resolve_auto(model: ModelAdapter, params: MethodParams | Mapping[str, Any] | None, context: FitContext,
                 *, self_influence: bool) -> tuple[type[AttributionMethod], MethodParams]:
    """`method="auto"` → (method class, its params), from the model's task and size, the
    purpose and `len(context.checkpoints)` (`attribution.methods.auto.choose_method`);
    records `context.extras["auto"]`. `params`: `AutoParams` or its raw mapping."""
    if params is None or isinstance(params, Mapping):
        params = AutoParams.parse(params)
    if not isinstance(params, AutoParams):
        raise ValueError(f"method 'auto' takes AutoParams, got {type(params).__name__}")
    inputs = AutoInputs(task=str(model.task.name), self_influence=self_influence,
                        num_checkpoints=len(context.checkpoints),
                        num_parameters=sum(p.numel() for p in model.module.parameters()))
    choice = choose_method(inputs, params)
    cls = method_class(choice.method)
    chosen = cls.params_type.parse(choice.params).for_task(inputs.task)
    context.extras["auto"] = choice.report(chosen.to_dict())
    return cls, chosen


def attribute_many(
    model: ModelAdapter,
    method: str | MethodName | type[AttributionMethod],
    params: Sequence[MethodParams],
    train: TrainingSet,
    context: FitContext,
    *,
    queries: Sequence[Batch],
) -> list[BatchedScores]:
    """Joint scores `[1, N]` of several queries (query b: `params[b]`, `queries[b]`) from one pass
    over `train` (`AttributionMethod.score_many`), each normalised as `attribute` would.

    Every params object must have the same, non-None `batch_key`; raises `ValueError` otherwise.
    """
    cls = method if isinstance(method, type) else method_class(str(method))
    keys = {cls.batch_key(p) for p in params}
    if not params or len(keys) != 1 or None in keys:
        raise ValueError(f"{cls.name}: queries scored together need params of one batch_key")
    if len(train) == 0:
        raise ValueError("the training set is empty")
    instance = cls(model, params[0], context)
    instance.fit(train)
    results = instance.score_many(list(zip(params, queries, strict=True)), train)
    for p, result in zip(params, results, strict=True):
        if p.for_task(model.task.name).normalize == Normalize.RELATIVE:  # this query's own denominator
            own = cls(model, p, context)
            norms = cached_self_influence(own, train, relative_norm=True)
            result.scores = relative_scores(result.scores, norms, floor=own.relative_norm_floor())
    return results


def _check_request(cls: type[AttributionMethod], train: TrainingSet, queries: Batch | None,
                   per_sample: bool, self_influence: bool) -> None:
    if len(train) == 0:
        raise ValueError("the training set is empty")
    if self_influence:
        if queries is not None:
            raise ValueError("self_influence=True scores rows against themselves: pass queries=None")
        if per_sample:
            raise ValueError("per_sample does not apply to self_influence")
        if not cls.supports_self_influence:
            raise ValueError(f"{cls.name} does not define self-influence")
        return
    if queries is None:
        raise ValueError("queries are required unless self_influence=True")
    if len(queries) == 0:
        raise ValueError("queries must contain at least one sample")


class SelfInfluenceFit(FitArgs):
    """What a cached `[N]` self-influence vector depends on besides model and data: the method,
    its params but `normalize` (applied after), the checkpoints' digests and learning rates."""

    kind = "self_influence"
    method: str
    params: dict[str, Any]
    checkpoints: list[str]
    checkpoint_lrs: list[float]

    @classmethod
    def of(cls, method: str, params: MethodParams, checkpoints: Sequence[str], checkpoint_lrs: Sequence[float]) -> Self:
        stripped = {k: v for k, v in params.to_dict().items() if k != "normalize"}
        return cls(method=str(method), params=stripped, checkpoints=list(checkpoints),
                   checkpoint_lrs=list(checkpoint_lrs))


class RelativeNormFit(SelfInfluenceFit):
    """Likewise for the `[N]` squared norms RelatIF divides by (`relative_norm_squared`)."""

    kind = "relative_norm"


def cached_self_influence(instance: AttributionMethod, train: TrainingSet, *, relative_norm: bool = False) -> Tensor:
    """`[N]` self-influence (or, with `relative_norm`, the squared norms RelatIF divides by) of a
    fitted method, cached per (model, dataset, checkpoints, method, params ∖ normalize)."""
    args_type = RelativeNormFit if relative_norm else SelfInfluenceFit
    args = args_type.of(instance.name, instance.params, [c.digest() for c in instance.context.checkpoints],
                        instance.context.checkpoint_lrs)
    compute = instance.relative_norm_squared if relative_norm else instance.self_influence
    values = cached_tensors(instance.context.store, instance.context.fingerprint, args,
                            lambda: {args.kind: compute(train)})
    return values[args.kind]


def relative_scores(scores: Tensor, self_influence: Tensor, *, floor: float | None = None) -> Tensor:
    """RelatIF: `scores` `[Q, N]` / sqrt(max(s `[N]`, ε)), ε = max(1e-12, 1e-6·median|s|) unless
    the method gives its own `floor` (`AttributionMethod.relative_norm_floor`). Divides in
    float64 (squared norms of memorised rows lie below float32's range) and returns `scores`' dtype."""
    if self_influence.shape[-1] != scores.shape[-1]:
        raise ValueError(f"self-influence has {self_influence.shape[-1]} rows, scores {scores.shape[-1]}")
    s = self_influence.to(torch.float64)
    if floor is None:
        floor = max(ABSOLUTE_FLOOR, RELATIVE_FLOOR * float(s.abs().median()))
    return (scores.to(torch.float64) / torch.sqrt(s.clamp(min=floor))).to(scores.dtype)
