"""Training checkpoints θ_c named in a method's params: the ids (resolved by the service into
`FitContext.checkpoints`, in order), their learning rates η_c, the schedule `[(θ_c, η_c)]`
and the η_c-weighted sum of a per-row quantity over it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from attribution.methods.base import FitContext, ParamsError, stage_progress
from attribution.model import ModelAdapter


def check_checkpoint_params(ids: Sequence[str], lrs: Sequence[float]) -> None:
    """`ParamsError` unless every id is non-empty and `lrs` is empty or one finite η_c > 0 per id."""
    for position, model_id in enumerate(ids):
        if not model_id:
            raise ParamsError(f"checkpoint_model_ids[{position}]", "must be a non-empty model id")
    if lrs and len(lrs) != len(ids):
        raise ParamsError("checkpoint_lrs", f"{len(lrs)} learning rates for {len(ids)} checkpoint_model_ids; "
                                            "give one per id")
    for position, lr in enumerate(lrs):
        if not (math.isfinite(lr) and lr > 0):
            raise ParamsError(f"checkpoint_lrs[{position}]", "must be a finite number > 0")


def check_checkpoint_context(ids: Sequence[str], lrs: Sequence[float], context: FitContext) -> None:
    """The context must hold the checkpoints the params name (the service resolves them)."""
    if ids and len(context.checkpoints) != len(ids):
        raise ValueError(f"params name {len(ids)} checkpoints but the context holds {len(context.checkpoints)}; "
                         "resolve checkpoint_model_ids into FitContext.checkpoints")
    if lrs and list(lrs) != list(context.checkpoint_lrs):
        raise ValueError("params.checkpoint_lrs differ from FitContext.checkpoint_lrs")


def checkpoint_schedule(model: ModelAdapter, context: FitContext) -> list[tuple[ModelAdapter, float]]:
    """`[(θ_c, η_c)]`: the context's checkpoints with their learning rates, or `[(θ̂, 1)]`.

    An empty `checkpoint_lrs` with checkpoints means η_c = 1 for every checkpoint.
    """
    if not context.checkpoints:
        return [(model, 1.0)]
    lrs = context.checkpoint_lrs or [1.0] * len(context.checkpoints)
    if len(lrs) != len(context.checkpoints):
        raise ValueError(f"{len(context.checkpoints)} checkpoints but {len(lrs)} checkpoint learning rates")
    return list(zip(context.checkpoints, lrs, strict=True))


def checkpoint_sum(model: ModelAdapter, context: FitContext, num_rows: int,
                   value: Callable[[ModelAdapter, FitContext], Tensor]) -> Tensor:
    """`[N]` `Σ_c η_c v(θ_c)`: `value` `[N]` computed at each checkpoint of the schedule, η_c-weighted
    — TracInCP's sum over checkpoints (Pruthi et al. 2020, eq. 3). Each checkpoint gets a context
    of its own: the fingerprint extended by the checkpoint's digest (its cached artifacts), the
    same store, timings and autocast dtype, and its slice of the progress."""
    schedule = checkpoint_schedule(model, context)
    total = torch.zeros(num_rows, dtype=torch.float32)
    for stage, (checkpoint, lr) in enumerate(schedule):
        own = FitContext(
            fingerprint=f"{context.fingerprint}:checkpoint:{checkpoint.digest()}", store=context.store,
            progress=stage_progress(context.progress, stage, len(schedule)),
            timings=context.timings, amp_dtype=context.amp_dtype)
        total += lr * value(checkpoint, own).float()
    return total
