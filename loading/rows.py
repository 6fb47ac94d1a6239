"""What every shard reader yields and implements: `Rows` chunks and the `ShardReader` interface.

The formats' readers live in `readers.py` (`.npz`, `.pt`, and `open_reader`, which picks one by
extension) and `tabular.py` (`.parquet`, `.jsonl`); both import this module, never each other
in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from loading.errors import ShardError

COLUMNS = ("x", "y", "ids", "group", "text", "prompt", "completion")
TEXT_COLUMNS = ("text", "prompt", "completion")


@dataclass
class Rows:
    """A chunk of consecutive rows: numeric `x` `[n, ...]` / `y` `[n, ...]` and/or `text` (n strings).

    Prompt/completion rows keep their whole text in `text` (`prompt + completion`) and the
    prompt in `prompt`, so `text[i][len(prompt[i]):]` is row i's completion: the only part a
    causal LM's loss counts (`model_inputs.py`).
    """

    x: np.ndarray | None = None
    y: np.ndarray | None = None
    text: list[str] | None = None
    prompt: list[str] | None = None

    def __len__(self) -> int:
        if self.text is not None:
            return len(self.text)
        return 0 if self.y is None else int(self.y.shape[0])

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(
            None if self.x is None else self.x[start:stop],
            None if self.y is None else self.y[start:stop],
            None if self.text is None else self.text[start:stop],
            None if self.prompt is None else self.prompt[start:stop],
        )

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        if any(p.prompt is not None for p in parts) and all(p.text is not None for p in parts):
            # plain text rows beside prompt/completion rows: an empty prompt, the whole text counts
            parts = [p if p.prompt is not None else Rows(p.x, p.y, p.text, [""] * len(p)) for p in parts]
        first = parts[0]
        for part in parts[1:]:
            if (part.x is None) != (first.x is None) or (part.text is None) != (first.text is None) \
                    or (part.y is None) != (first.y is None):
                raise ShardError("shards", "shards of one dataset must have the same columns")
            if part.x is not None and first.x is not None and part.x.shape[1:] != first.x.shape[1:]:
                raise ShardError("shards", f"shards disagree on the row shape of x: {first.x.shape[1:]} vs {part.x.shape[1:]}")
        return Rows(
            None if first.x is None else np.concatenate([p.x for p in parts]),
            None if first.y is None else np.concatenate([p.y for p in parts]),
            None if first.text is None else [t for p in parts for t in p.text],  # type: ignore[union-attr]
            None if first.prompt is None else [t for p in parts for t in p.prompt],  # type: ignore[union-attr]
        )


class ShardReader:
    """Base: `num_rows`, `columns`, `iter_rows(start, stop, chunk)`, `column(name)`."""

    format: str
    num_rows: int
    columns: set[str]

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        raise NotImplementedError

    def column(self, name: str) -> list[Any] | None:
        """A small per-row column (`ids`, `group`) as a Python list, or `None` if absent."""
        raise NotImplementedError

    def check_integrity(self) -> None:
        """Format-level checksums beyond what reading the rows checks (registration only)."""
        return None

    def close(self) -> None:
        return None

    def _check_lengths(self, lengths: dict[str, int]) -> None:
        if "y" not in lengths and "text" not in lengths:
            raise ShardError("uri", f"{self.format} shard needs arrays x and y (or a text column)")
        if "text" not in lengths and "x" not in lengths:
            raise ShardError("uri", f"{self.format} shard has y but no x")
        values = set(lengths.values())
        if len(values) > 1:
            detail = ", ".join(f"len({k})={v}" for k, v in sorted(lengths.items()))
            raise ShardError("uri", f"columns have different lengths: {detail}")
        self.num_rows = values.pop() if values else 0
