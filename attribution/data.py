"""Training and query data as the methods see it: batches of tensors with global row indices.

A `TrainingSet` is anything that can say how many rows it has and yield them in order as
`Batch`es; the workers implement it over shard files (streamed, never all in memory), the
tests over in-memory tensors. Row `i` of the set is global row `offset + i`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from attribution.tasks import Inputs


@dataclass(frozen=True)
class Batch:
    """`inputs` `[B, ...]` (or a mapping of `[B, ...]` tensors), `targets` `[B, ...]`."""

    inputs: Inputs
    targets: Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(_move(self.inputs, device), self.targets.to(device))

    def slice(self, start: int, stop: int) -> Batch:
        """Rows `start:stop` of the batch."""
        if isinstance(self.inputs, Mapping):
            inputs: Inputs = {k: v[start:stop] for k, v in self.inputs.items()}
        else:
            inputs = self.inputs[start:stop]
        return Batch(inputs, self.targets[start:stop])

    def select(self, index: Tensor) -> Batch:
        """Rows at `index` `[K]` (int64)."""
        if isinstance(self.inputs, Mapping):
            inputs: Inputs = {k: v[index] for k, v in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        return Batch(inputs, self.targets[index])


def _move(inputs: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """One batch from several with the same input structure."""
    first = batches[0].inputs
    if isinstance(first, Mapping):
        inputs: Inputs = {
            k: torch.cat([b.inputs[k] for b in batches])  # type: ignore[index]
            for k in first
        }
    else:
        inputs = torch.cat([b.inputs for b in batches])  # type: ignore[misc]
    return Batch(inputs, torch.cat([b.targets for b in batches]))


@runtime_checkable
class TrainingSet(Protocol):
    """Ordered rows, read in batches. Implementations stream; they never need all rows in memory."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        """Yield `(start, batch)` in row order, `start` the local index of the batch's first row."""
        ...


class TensorTrainingSet:
    """A `TrainingSet` over tensors held in memory (tests, benchmarks, small data)."""

    def __init__(self, inputs: Inputs, targets: Tensor) -> None:
        self._all = Batch(inputs, targets)

    def __len__(self) -> int:
        return len(self._all)

    def batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        for start in range(0, len(self), batch_size):
            yield start, self._all.slice(start, start + batch_size)

    def rows(self, index: Tensor) -> Batch:
        """Rows at `index` as one batch."""
        return self._all.select(index)

    @property
    def all(self) -> Batch:
        return self._all
