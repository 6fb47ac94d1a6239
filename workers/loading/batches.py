"""Raw rows (numbers or text) → `Batch`es shaped the way the registered model expects.

`InputSpec` says how: classification targets are int64 class indices, regression targets
float32, causal-LM targets token ids with `-100` at padding. `x` becomes float32, except for
models that read token ids (Hugging Face models, causal LMs), where it stays int64. Text is
tokenized with the model's own tokenizer, padded to the longest row of the batch and
truncated to the model's context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attribution.data import Batch
from attribution.model import ModelAdapter
from attribution.tasks import TaskName
from workers.loading.errors import ShardError
from workers.loading.readers import Rows


@dataclass(frozen=True)
class InputSpec:
    task: TaskName
    token_inputs: bool
    tokenizer: Any = None
    max_length: int | None = None


def input_spec(model_row: Any, adapter: ModelAdapter, tokenizer: Any) -> InputSpec:
    """How rows are turned into batches for this registered model."""
    task = TaskName(model_row.task)
    token_inputs = model_row.format == "hf" or task == TaskName.CAUSAL_LM
    return InputSpec(task=task, token_inputs=token_inputs, tokenizer=tokenizer,
                     max_length=_context_length(adapter, tokenizer))


def _context_length(adapter: ModelAdapter, tokenizer: Any) -> int | None:
    limits = []
    config = getattr(adapter.module, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def rows_to_batch(rows: Rows, spec: InputSpec, *, field: str = "shards") -> Batch:
    """A `Batch` of `len(rows)` rows (inputs `[n, ...]` or a mapping of token tensors, targets `[n, ...]`)."""
    if rows.text is not None:
        return _text_batch(rows, spec, field)
    if rows.x is None or rows.y is None:
        raise ShardError(field, "rows need x and y")
    x = torch.from_numpy(_writable(rows.x))
    inputs = x.long() if spec.token_inputs else x.float()
    return Batch(inputs, _targets(rows.y, spec))


def _targets(y: np.ndarray, spec: InputSpec) -> torch.Tensor:
    tensor = torch.from_numpy(_writable(y))
    if spec.task == TaskName.REGRESSION:
        return tensor.float()
    return tensor.long()


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous writable array (stream buffers are read-only views), copying only if needed."""
    if array.flags.writeable and array.flags.c_contiguous:
        return array
    return np.array(array, copy=True, order="C")


def _text_batch(rows: Rows, spec: InputSpec, field: str) -> Batch:
    if spec.tokenizer is None:
        raise ShardError(field, "text rows need a Hugging Face model with a tokenizer in its folder")
    encoded = spec.tokenizer(
        rows.text, padding=True, truncation=spec.max_length is not None, max_length=spec.max_length,
        return_tensors="pt",
    )
    input_ids = encoded["input_ids"].long()
    attention = encoded["attention_mask"].long()
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    if spec.task == TaskName.CAUSAL_LM:
        return Batch(inputs, input_ids.masked_fill(attention == 0, -100))
    if rows.y is None:
        raise ShardError(field, f"text rows for {spec.task.value} need labels y")
    return Batch(inputs, _targets(rows.y, spec))
