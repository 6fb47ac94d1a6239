"""P differentiated: the parameters a job's gradients, curvature and projections cover.

A method restricted to some layers (`layers` prefixes; the gradient-feature methods'
`last_layer`, which TracIn turns on by default for classifiers) differentiates only those
parameters, while its forward passes still run the whole model. The count comes from the
registered model's `ModelStructure` (names and sizes recorded at registration) after the
task's defaults are resolved as the worker resolves them (the params' `for_task`) and the
layers are chosen as the method chooses them (`requested_layers`).
"""

from __future__ import annotations

from attribution.methods.base import MethodParams
from attribution.methods.gradient_features import GradientFeatureParams, requested_layers
from attribution.structure import ModelStructure


def tracked_layers(params: MethodParams, task: str, structure: ModelStructure) -> list[str]:
    """The layer prefixes a job of these params tracks on this model (empty: every parameter)."""
    resolved = params.for_task(task)
    if isinstance(resolved, GradientFeatureParams):
        return requested_layers(resolved, structure.parameters) or []
    return list(getattr(resolved, "layers", ()))


def tracked_parameters(params: MethodParams, task: str, structure: ModelStructure | None) -> int | None:
    """The parameter count a job differentiates, or None when unknown (no structure, or one
    recorded without sizes: the model's full count then stands in, an over-estimate)."""
    if structure is None:
        return None
    return structure.num_tracked(tracked_layers(params, task, structure))
