"""Query samples (`samples` of `POST /v1/queries`) → a `Batch` the registered model accepts.

Four forms (API.md "Queries"): inline numbers `{"x": [...], "y": [...]}` (`y` optional:
classification then explains the model's own predicted class, causal LMs their tokens),
`{"text": [...]}` for Hugging Face models (causal LMs; classifiers also need `y`),
`{"prompt": [...], "completion": [...]}` for causal LMs (the loss counts the completion's
tokens only), and `{"refs": [{"dataset_id", "index"}]}` naming training rows of the
tenant's datasets.
`check_samples_against_model` builds the batch and runs one forward pass, so a sample that does not
fit the model is refused at submission with the field named; the job rebuilds the same
batch with `samples_to_batch`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from attribution.data import Batch
from attribution.model import ModelAdapter
from attribution.tasks import TaskName
from loading.errors import LoadError, SamplesError
from loading.model_inputs import InputSpec, input_spec, rows_to_batch
from loading.models import load_model, load_tokenizer
from loading.rows import Rows
from loading.sample_structure import check_samples
from loading.shards import ShardedTrainingSet
from service.db.repositories import datasets as dataset_repo
from service.settings import Settings


def check_samples_against_model(samples: dict[str, Any], *, model_row: Any, dataset_row: Any, settings: Settings,
                  session: Session) -> int:
    """Validate the samples against the model (one forward pass); the number of query samples.

    Raises `SamplesError` naming the field (`samples.x`, `samples.y[3]`, `samples.refs[0].index`, ...).
    """
    model = load_model(model_row, settings)
    spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
    batch, labelled = _build(samples, spec, model_row, settings, session)
    _check_against_model(batch, labelled, samples, model, spec)
    _check_against_dataset(batch, dataset_row, spec, settings)
    return len(batch)


def samples_to_batch(samples: dict[str, Any], *, model_row: Any, model: ModelAdapter, settings: Settings,
                     session: Session) -> Batch:
    """The query batch (inputs `[Q, ...]`, targets `[Q, ...]`) for a job; labels filled in when absent."""
    spec = input_spec(model_row, model, load_tokenizer(model_row, settings))
    batch, labelled = _build(samples, spec, model_row, settings, session)
    return batch if labelled else _with_targets(batch, samples, model, spec)


# ----------------------------------------------------------------------- building
def _build(samples: Any, spec: InputSpec, model_row: Any, settings: Settings, session: Session) -> tuple[Batch, bool]:
    """The batch and whether its targets are real labels (`False`: placeholders for `_with_targets`).

    The samples object's structure (forms, rectangular finite numbers, counts) is checked by
    `check_samples` first; what is left here needs the model (its task, tokenizer, datasets)."""
    check_samples(samples)
    if "x" in samples:
        return _inline_numbers(samples, spec)
    if "text" in samples:
        return _inline_text(samples, spec)
    if "prompt" in samples:
        return _prompt_completion(samples, spec), True
    return _referenced_rows(samples["refs"], spec, model_row, settings, session), True


def _inline_numbers(samples: dict[str, Any], spec: InputSpec) -> tuple[Batch, bool]:
    x = np.asarray(samples["x"])  # [Q, ...] rectangular numbers (check_samples)
    if spec.token_inputs and (x.dtype.kind == "f" and not (x == np.round(x)).all()):
        raise SamplesError("samples.x", "this model reads token ids: x must hold integers")
    y = None
    if "y" in samples:
        y = np.asarray(samples["y"])
        if spec.task != TaskName.REGRESSION and y.dtype.kind == "f" and not (y == np.round(y)).all():
            raise SamplesError("samples.y", f"{spec.task.value} labels must be integers")
    placeholder = y if y is not None else np.zeros(len(x), dtype=np.int64)
    return rows_to_batch(Rows(x=x, y=placeholder), spec, field="samples.x"), y is not None


def _inline_text(samples: dict[str, Any], spec: InputSpec) -> tuple[Batch, bool]:
    texts = samples["text"]
    if spec.tokenizer is None:
        raise SamplesError("samples.text", "text samples need a Hugging Face model with a tokenizer in its folder")
    y = None
    if "y" in samples:
        y = np.asarray(samples["y"])
    elif spec.task == TaskName.REGRESSION:
        raise SamplesError("samples.y", "regression text samples need targets y")
    try:
        batch = rows_to_batch(Rows(text=texts, y=y if y is not None else np.zeros(len(texts), dtype=np.int64)),
                              spec, field="samples.text")
    except LoadError as exc:
        raise SamplesError(exc.field, exc.message) from None
    return batch, y is not None or spec.task == TaskName.CAUSAL_LM


def _prompt_completion(samples: dict[str, Any], spec: InputSpec) -> Batch:
    prompts, completions = samples["prompt"], samples["completion"]
    if spec.task != TaskName.CAUSAL_LM:
        raise SamplesError("samples.prompt", "prompt/completion samples need a causal_lm model")
    if spec.tokenizer is None:
        raise SamplesError("samples.prompt", "text samples need a Hugging Face model with a tokenizer in its folder")
    try:
        return rows_to_batch(Rows(text=[p + c for p, c in zip(prompts, completions, strict=True)], prompt=prompts),
                             spec, field="samples.completion")
    except LoadError as exc:
        raise SamplesError(exc.field, exc.message) from None


def _referenced_rows(refs: Any, spec: InputSpec, model_row: Any, settings: Settings, session: Session) -> Batch:
    sets: dict[str, ShardedTrainingSet] = {}
    parts: list[Rows] = []
    for i, ref in enumerate(refs):
        field = f"samples.refs[{i}]"
        index = ref.get("index")
        dataset_id = ref["dataset_id"]
        if dataset_id not in sets:
            dataset = dataset_repo.get_dataset(session, model_row.tenant, dataset_id)
            if dataset is None:
                raise SamplesError(f"{field}.dataset_id", "unknown dataset")
            try:
                sets[dataset_id] = ShardedTrainingSet.for_dataset(dataset, spec, settings, prefetch=False)
            except LoadError as exc:
                raise SamplesError(f"{field}.dataset_id", f"the dataset cannot be read: {exc}") from None
        training = sets[dataset_id]
        if not index < len(training):  # a non-negative integer (check_samples)
            raise SamplesError(f"{field}.index", f"must be a row index between 0 and {len(training) - 1}")
        parts.append(training.rows_at([index]))
    try:
        return rows_to_batch(Rows.concat(parts), spec, field="samples.refs")
    except LoadError as exc:
        raise SamplesError("samples.refs", exc.message) from None


# ----------------------------------------------------------------------- labels and checks
def _with_targets(batch: Batch, samples: dict[str, Any], model: ModelAdapter, spec: InputSpec) -> Batch:
    """Fill missing labels: the predicted class (classification) or the tokens themselves (causal LM)."""
    if spec.task == TaskName.CAUSAL_LM:
        return Batch(batch.inputs, _as_tensor(batch.inputs).long())
    if spec.task == TaskName.REGRESSION:
        raise SamplesError("samples.y", "regression queries need targets y")
    outputs = _forward(model, batch, "samples.x" if "x" in samples else "samples.text")
    return Batch(batch.inputs, outputs.reshape(outputs.shape[0], -1).argmax(dim=1).cpu())


def _as_tensor(inputs: Any) -> torch.Tensor:
    return inputs["input_ids"] if isinstance(inputs, dict) else inputs


def _forward(model: ModelAdapter, batch: Batch, field: str) -> torch.Tensor:
    try:
        with torch.inference_mode():
            moved = batch.to(model.device)
            return model.task.forward(model.module, moved.inputs).float()
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise SamplesError(field, f"the model cannot run on these inputs ({exc.__class__.__name__}: {message[:300]})") from None


def _check_against_model(batch: Batch, labelled: bool, samples: dict[str, Any], model: ModelAdapter,
                         spec: InputSpec) -> None:
    field = next((f"samples.{name}" for name in ("x", "text", "completion") if name in samples), "samples.refs")
    vocabulary = getattr(getattr(model.module, "config", None), "vocab_size", None)
    if spec.token_inputs and isinstance(vocabulary, int):
        tokens = _as_tensor(batch.inputs)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocabulary):
            raise SamplesError(field, f"token ids must lie between 0 and {vocabulary - 1}")
    outputs = _forward(model, batch, field)
    if not torch.isfinite(outputs).all():
        raise SamplesError(field, "the model's outputs on these samples are not finite")
    if not labelled:
        _with_targets(batch, samples, model, spec)
        return
    label_field = "samples.y" if "y" in samples else field
    if spec.task == TaskName.CLASSIFICATION:
        classes = outputs.reshape(outputs.shape[0], -1).shape[1]
        targets = batch.targets.reshape(-1)
        if targets.numel() != outputs.shape[0]:
            raise SamplesError(label_field, "classification needs one integer label per sample")
        bad = ((targets < 0) | (targets >= classes)).nonzero()
        if len(bad):
            raise SamplesError(f"{label_field}[{int(bad[0])}]", f"label must be a class index between 0 and {classes - 1}")
    elif spec.task == TaskName.REGRESSION:
        if outputs.reshape(outputs.shape[0], -1).shape[1] != batch.targets.reshape(batch.targets.shape[0], -1).shape[1]:
            raise SamplesError(label_field, f"targets have shape {list(batch.targets.shape[1:])} per sample; the model "
                               f"predicts {list(outputs.shape[1:])}")
    else:
        counted = (batch.targets[:, 1:] != -100).any(dim=1)
        if not bool(counted.all()):
            row = int((~counted).nonzero()[0])
            raise SamplesError(f"{label_field}[{row}]", "has no token the loss can count (a completion needs at least one "
                               "token within the model's context length, a text at least two tokens)")
        vocabulary = outputs.shape[-1]
        tokens = batch.targets[batch.targets != -100]
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocabulary):
            raise SamplesError(label_field, f"token ids must lie between 0 and {vocabulary - 1}")


def _check_against_dataset(batch: Batch, dataset_row: Any, spec: InputSpec, settings: Settings) -> None:
    """Query rows must look like training rows (same per-row input shape)."""
    if dataset_row is None or not dataset_row.num_samples or spec.token_inputs or isinstance(batch.inputs, dict):
        return
    try:
        first = ShardedTrainingSet.for_dataset(dataset_row, spec, settings, row_stop=1, prefetch=False, verify=False)
        row = first.rows_at([0])
    except LoadError:
        return  # the dataset's own problems are reported by the job, not blamed on the samples
    inputs = batch.inputs
    if row.x is not None and isinstance(inputs, torch.Tensor) and tuple(row.x.shape[1:]) != tuple(inputs.shape[1:]):
        raise SamplesError("samples.x", f"each sample has shape {list(inputs.shape[1:])} but the dataset's rows "
                           f"have shape {list(row.x.shape[1:])}")

