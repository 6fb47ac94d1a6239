"""Raw rows (numbers or text) → `Batch`es shaped the way the registered model expects.

`InputSpec` says how: classification targets are int64 class indices, regression targets
float32, causal-LM targets token ids with `-100` at padding. `x` becomes float32, except for
models that read token ids (Hugging Face models, causal LMs), where it stays int64.

Text is tokenized with the model's own tokenizer, truncated to `max_length` tokens (the
model's context length: the smallest of the config's `max_position_embeddings` /
`n_positions` and the tokenizer's `model_max_length`; longer rows keep their first
`max_length` tokens and are counted in `TextBatch.truncated`), and right-padded to the
longest row of the batch. Prompt/completion rows are tokenized as `tokens(prompt)`
followed by `tokens(completion)` (no special tokens added to the completion), and only the
completion's tokens are targets. Causal-LM batches carry no attention mask: with right
padding a causal model's real tokens never attend to the padding after them, so the mask
changes nothing at counted positions (targets are −100 at padding), and leaving it out
keeps the fused causal attention kernels. Other models get the padding mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attribution.data import Batch
from attribution.model import ModelAdapter
from attribution.tasks import TaskName
from loading.errors import ShardError
from loading.rows import Rows


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


@dataclass(frozen=True)
class TextBatch:
    """A tokenized batch and `truncated` `[n]` bool: rows cut to `max_length` tokens."""

    batch: Batch
    truncated: np.ndarray


def text_batch(rows: Rows, spec: InputSpec, *, field: str = "shards") -> TextBatch:
    """Tokenize text rows (see the module docstring): inputs `[n, T]`, T the longest row."""
    tokenizer = spec.tokenizer
    if tokenizer is None:
        raise ShardError(field, "text rows need a Hugging Face model with a tokenizer in its folder")
    if rows.text is None:
        raise ShardError(field, "rows have no text")
    if rows.prompt is None:
        sequences = tokenizer(rows.text)["input_ids"]
        counted_from = [0] * len(sequences)
    else:
        prompts = tokenizer(rows.prompt)["input_ids"]
        completions = tokenizer([t[len(p):] for t, p in zip(rows.text, rows.prompt, strict=True)],
                                add_special_tokens=False)["input_ids"]
        sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
        counted_from = [len(p) for p in prompts]
    limit = spec.max_length
    truncated = np.array([limit is not None and len(ids) > limit for ids in sequences], dtype=bool)
    if limit is not None:
        sequences = [ids[:limit] for ids in sequences]
    if any(len(ids) == 0 for ids in sequences):
        raise ShardError(field, "a text row has no tokens")
    length = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(sequences), length), int(pad), dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
    if spec.task == TaskName.CAUSAL_LM:
        positions = torch.arange(length)
        counted = (attention == 1) & (positions >= torch.tensor(counted_from).unsqueeze(1))
        return TextBatch(Batch({"input_ids": input_ids}, input_ids.masked_fill(~counted, -100)), truncated)
    if rows.y is None:
        raise ShardError(field, f"text rows for {spec.task.value} need labels y")
    return TextBatch(Batch({"input_ids": input_ids, "attention_mask": attention}, _targets(rows.y, spec)), truncated)


def split_by_tokens(batch: Batch, token_budget: int) -> list[tuple[int, Batch]]:
    """`(offset, sub-batch)` pieces of a token batch `[n, T]` with at most `token_budget` padded
    tokens each (at least one row), every piece cut to its own longest row.

    Memory of a forward or per-sample-gradient pass grows with rows × padded length, so text
    batches are sized by tokens, not rows: 512-token rows under a 16,384-token budget are
    swept 32 at a time whatever `batch_size` the method asked for.
    """
    inputs = batch.inputs
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        return [(0, batch)]
    length = int(inputs["input_ids"].shape[1])
    rows = max(1, token_budget // max(length, 1))
    if rows >= len(batch):
        return [(0, batch)]
    return [(start, _trimmed(batch.slice(start, start + rows))) for start in range(0, len(batch), rows)]


def _trimmed(batch: Batch) -> Batch:
    """The batch without trailing columns that are padding in every row."""
    inputs = batch.inputs
    if not isinstance(inputs, Mapping):
        return batch
    mask = inputs.get("attention_mask")
    used = mask.bool() if mask is not None else batch.targets != -100
    columns = used.any(dim=0).nonzero()
    length = int(columns.max()) + 1 if len(columns) else 1
    trimmed = {name: value[:, :length] for name, value in inputs.items()}
    targets = batch.targets[:, :length] if mask is None else batch.targets
    return Batch(trimmed, targets)


def _text_batch(rows: Rows, spec: InputSpec, field: str) -> Batch:
    return text_batch(rows, spec, field=field).batch
