"""Forward-INF's second half: the sweep (Algorithm 1, line 5).

It evaluates every unlearned model on every training row in one inference pass: each batch
is read once and all Q models are evaluated on it (`[Q, B]` losses per batch), under
`torch.inference_mode()` and the optional CUDA autocast. `CastTrainingSet` / `cast_batch`
feed fp64 model copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from attribution.data import Batch, TrainingSet
from attribution.device import autocast
from attribution.model import ModelAdapter

# Losses of Q models on one batch: Batch → [Q, B].
BatchLosses = Callable[[Batch], Tensor]


def copies_losses(copies: list[ModelAdapter]) -> BatchLosses:
    """Batch → `[Q, B]`: every copy evaluated on a batch read once (TorchScript fallback)."""

    def evaluate(batch: Batch) -> Tensor:
        batch = batch.to(copies[0].device)
        return torch.stack([c.loss(batch) for c in copies])

    return evaluate


def sweep(
    evaluate: BatchLosses,
    train: TrainingSet,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: Callable[[float], None] | None = None,
) -> Tensor:
    """`[Q, N]` CPU losses (float64 if the models run in fp64, else float32), one pass."""
    total = len(train)
    out: Tensor | None = None
    with torch.inference_mode(), autocast(device, amp_dtype):
        for start, batch in train.batches(batch_size):
            losses = evaluate(batch)
            losses = (losses if losses.dtype == torch.float64 else losses.float()).cpu()
            if out is None:
                out = torch.empty(losses.shape[0], total, dtype=losses.dtype)
            out[:, start: start + losses.shape[1]] = losses
            if progress is not None:
                progress((start + losses.shape[1]) / total)
    if out is None:
        raise ValueError("the training set is empty")
    return out


class CastTrainingSet:
    """A `TrainingSet` view whose floating-point inputs are cast to `dtype` (fp64 sweeps)."""

    def __init__(self, train: TrainingSet, dtype: torch.dtype) -> None:
        self.train = train
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.train)

    def batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        for start, batch in self.train.batches(batch_size):
            yield start, cast_batch(batch, self.dtype)


def cast_batch(batch: Batch, dtype: torch.dtype) -> Batch:
    """Floating-point inputs → `dtype`; integer inputs (token ids) and targets unchanged."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if isinstance(batch.inputs, Mapping):
        return Batch({k: cast(v) for k, v in batch.inputs.items()}, batch.targets)
    return Batch(cast(batch.inputs), batch.targets)
