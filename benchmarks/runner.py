"""Run one attribution method through the core library's `attribute` pipeline and time it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.methods.auto import AUTO, AutoParams
from attribution.methods.base import FitContext, MethodParams
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from benchmarks.cli import Stopwatch


@dataclass(frozen=True)
class Variant:
    """One row of a study's method table: `method` with fixed `params`, or the best point of
    `grid` on the study's validation points. `one_query_at_a_time`: score each query in its own
    call (methods whose per-sample path would share work across queries, or costly ones timed per
    query); `max_queries`: evaluate on the first queries only; `context`: the name of the fitted
    artifacts to share (default: the method's own)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: tuple[dict[str, Any], ...] = ()
    one_query_at_a_time: bool = False
    max_queries: int | None = None
    context: str = ""


@dataclass(frozen=True)
class Run:
    """Scores `[Q, N]` (per-sample queries) or `[N]` (self-influence) and the wall time."""

    scores: Tensor
    seconds: float
    extras: dict[str, Any]


def scores(model: ModelAdapter, method: str, params: dict[str, Any], train: TrainingSet, context: FitContext,
           queries: Batch) -> Run:
    """Per-sample scores `[Q, N]` of every query against every training row."""
    parsed = _parsed(method, params)
    with Stopwatch() as watch:
        out = attribute(model, method, parsed, train, context, queries=queries, per_sample=True)
    return Run(out, watch.seconds, dict(context.extras))


def self_influence(model: ModelAdapter, method: str, params: dict[str, Any], train: TrainingSet,
                   context: FitContext) -> Run:
    """Self-influence `[N]` of every training row."""
    parsed = _parsed(method, params)
    with Stopwatch() as watch:
        out = attribute(model, method, parsed, train, context, queries=None, self_influence=True)
    return Run(out.reshape(-1), watch.seconds, dict(context.extras))


def _parsed(method: str, params: dict[str, Any]) -> MethodParams:
    """The typed params (parsed before timing starts); `auto` takes `AutoParams`."""
    return AutoParams.parse(params) if method == AUTO else parse_params(method, params)


def describe(method: str, params: dict[str, Any]) -> str:
    """`method(k=v, ...)` for tables."""
    inner = ", ".join(f"{k}={v}" for k, v in params.items() if k != "batch_size")
    return f"{method}({inner})" if inner else method
