"""Training checkpoints θ_c named in a method's params: the ids (resolved by the service into
`FitContext.checkpoints`, in order) and their learning rates η_c."""

from __future__ import annotations

import math
from collections.abc import Sequence

from attribution.methods.base import FitContext, ParamsError


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
