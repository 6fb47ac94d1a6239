"""Training-data attribution core library (torch only; no web, queue or database code).

    from attribution import ModelAdapter, TensorTrainingSet, Batch, FitContext, attribute, task_for
    model = ModelAdapter(module, task_for("classification"))
    scores = attribute(model, "forward_inf", {"steps": 5, "lr": 0.01}, train,
                       FitContext(fingerprint="model-sha:data-sha"), queries=Batch(x, y))   # [1, N]
    best = top_k(scores[0], 10)

Methods are looked up by name in the registry (`available_methods()`); `attribution.evaluation`
holds the quality metrics (leave-one-out, LDS, mirrored correlation, leakage, mislabel AUC).
"""

from attribution import evaluation
from attribution.artifacts import ArtifactStore, InMemoryArtifacts, artifact_key, cached_tensors
from attribution.data import Batch, TensorTrainingSet, TrainingSet, concat_batches
from attribution.device import autocast, resolve_device
from attribution.groups import group_scores, shard_group_ids
from attribution.methods.base import (
    AttributionMethod,
    FitContext,
    MethodName,
    MethodParams,
    Normalize,
    ParamsError,
)
from attribution.methods.registry import (
    UnknownMethodError,
    available_methods,
    method_class,
    parse_params,
    register,
)
from attribution.model import ModelAdapter
from attribution.pipeline import attribute, relative_scores
from attribution.tasks import (
    CausalLMTask,
    ClassificationTask,
    RegressionTask,
    Task,
    TaskName,
    task_for,
)
from attribution.topk import TopK, bottom_k, merge_top_k, top_k

__all__ = [
    "ArtifactStore",
    "AttributionMethod",
    "Batch",
    "CausalLMTask",
    "ClassificationTask",
    "FitContext",
    "InMemoryArtifacts",
    "MethodName",
    "MethodParams",
    "ModelAdapter",
    "Normalize",
    "ParamsError",
    "RegressionTask",
    "Task",
    "TaskName",
    "TensorTrainingSet",
    "TopK",
    "TrainingSet",
    "UnknownMethodError",
    "artifact_key",
    "attribute",
    "autocast",
    "available_methods",
    "bottom_k",
    "cached_tensors",
    "concat_batches",
    "evaluation",
    "group_scores",
    "merge_top_k",
    "method_class",
    "parse_params",
    "register",
    "relative_scores",
    "resolve_device",
    "shard_group_ids",
    "task_for",
    "top_k",
]
