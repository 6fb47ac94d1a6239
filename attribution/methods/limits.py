"""Maximums of the method parameters that scale a job's cost, checked for every method.

Each entry bounds one params field by name, whichever method declares it: an integer field
by its value, a list field (`checkpoint_model_ids`) by its length. A job's work grows with
these (steps × sweeps, iterations × curvature passes, rows × feature dims), so an unbounded
value is a job that never ends; beyond the maximum `MethodParams` raises `ParamsError`
naming the field and the maximum (422 at `POST /v1/queries`). The README's limits table
lists the same values (a test keeps them in step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attribution.ihvp.exact import DEFAULT_MAX_PARAMS

MAXIMUMS: dict[str, int] = {
    "batch_size": 65_536,  # rows per forward/gradient batch (memory)
    "fit_batch_size": 65_536,  # rows per curvature batch (memory)
    "steps": 1_000,  # Forward-INF unlearning steps K; Integrated Influence path steps K (one fit + sweep each)
    "unlearn_steps": 1_000,  # Integrated Influence baseline unlearning steps
    "cg_max_iter": 10_000,  # conjugate-gradient iterations (one curvature pass each)
    "lissa_depth": 10_000,  # LiSSA recursion depth (one curvature batch each)
    "lissa_repeats": 100,  # LiSSA independent repeats (× depth)
    "arnoldi_rank": 1_000,  # kept eigenpairs (rank × P floats)
    "arnoldi_iterations": 2_000,  # Krylov dimension (one curvature pass and one P-vector each)
    "rank": 1_000,  # Integrated Influence low-rank compression (Arnoldi rank)
    "exact_max_params": DEFAULT_MAX_PARAMS,  # dense P × P curvature: memory grows as P²
    "fit_rows": 10_000_000,  # training rows used to fit the curvature
    "projection_dim": 1 << 16,  # projected gradient features per row
    "chunk_size": 4_096,  # rows unlearned together for Forward-INF self-influence
    "checkpoint_model_ids": 64,  # checkpoints θ_c (one featurisation of the training set each)
    "resamples": 32,  # stability resamples R (`attribution.stability`: up to one more run of the method each)
}


def first_excess(params: Any) -> tuple[str, int, int] | None:
    """`(field, value, maximum)` of the first field of the params dataclass `params` above its
    maximum (a list field's value is its length; None, "automatic", is never above); else None."""
    for field in dataclasses.fields(params):
        maximum = MAXIMUMS.get(field.name)
        value = getattr(params, field.name)
        if maximum is None or value is None or isinstance(value, bool):
            continue
        size = len(value) if isinstance(value, tuple | list) else value
        if isinstance(size, int) and size > maximum:
            return field.name, size, maximum
    return None
