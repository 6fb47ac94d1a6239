"""Row readers for the tabular shard formats: `.parquet` (pyarrow, row group by row group)
and `.jsonl` (one JSON object per line with a `text` field, or `prompt` and `completion`
fields, optional `y` and `id`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loading.errors import ShardError
from loading.rows import COLUMNS, Rows, ShardReader


# --------------------------------------------------------------------------- parquet
class ParquetReader(ShardReader):
    format = "parquet"

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:
            raise ShardError("uri", f"not a valid parquet file: {exc.__class__.__name__}") from None
        names = set(self.file.schema_arrow.names)
        self.columns = names & set(COLUMNS)
        self.text_columns = text_columns(names)
        if not ({"x", "y"} <= names or self.text_columns):
            raise ShardError("uri", "parquet shard needs columns x and y, text, or prompt and completion "
                                    f"(found: {', '.join(sorted(names)) or 'none'})")
        self.num_rows = int(self.file.metadata.num_rows)
        self.data_columns = [c for c in ("y", *self.text_columns) if c in self.columns]
        if "x" in self.columns and not self.text_columns:
            self.data_columns.insert(0, "x")

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        groups: list[int] = []
        first_row = 0
        offset = 0
        for index in range(self.file.num_row_groups):
            rows = self.file.metadata.row_group(index).num_rows
            if offset + rows > start and offset < stop:
                if not groups:
                    first_row = offset
                groups.append(index)
            offset += rows
        if not groups:
            return
        position = first_row
        for record_batch in self.file.iter_batches(batch_size=chunk, row_groups=groups, columns=self.data_columns):
            n = record_batch.num_rows
            lo, hi = max(start - position, 0), min(stop - position, n)
            position += n
            if hi <= lo:
                if position >= stop:
                    return
                continue
            part = record_batch.slice(lo, hi - lo)
            texts = {name: _arrow_text(part.column(name), name) for name in self.text_columns}
            yield text_rows(
                texts,
                x=_arrow_numeric(part.column("x"), "x") if "x" in self.data_columns else None,
                y=_arrow_numeric(part.column("y"), "y") if "y" in self.data_columns else None,
            )
            if position >= stop:
                return

    def column(self, name: str) -> list[Any] | None:
        if name not in self.columns:
            return None
        values = self.file.read(columns=[name]).column(name)
        if values.null_count:
            raise ShardError("uri", f"column {name} has missing values")
        return values.to_pylist()


def _arrow_numeric(array: Any, name: str) -> np.ndarray:
    """A (possibly nested) list or scalar numeric arrow column → `[n, ...]` numpy array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise ShardError("uri", f"column {name} has missing values")
        if pa.types.is_fixed_size_list(array.type):
            width = array.type.list_size
        else:
            lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise ShardError("uri", f"column {name} is ragged: every row needs the same number of values")
            width = int(lengths[0]) if len(lengths) else 0
        shape.append(width)
        array = array.flatten()
    if array.null_count:
        raise ShardError("uri", f"column {name} has missing values")
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        raise ShardError("uri", f"column {name} must hold numbers, not {array.type}")
    return np.asarray(array.to_numpy(zero_copy_only=False)).reshape(shape)


def _arrow_text(array: Any, name: str) -> list[str]:
    import pyarrow as pa

    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ShardError("uri", f"column {name} must hold strings, not {array.type}")
    if array.null_count:
        raise ShardError("uri", f"column {name} has missing values")
    return array.to_pylist()


def text_columns(names: set[str]) -> tuple[str, ...]:
    """The text columns a shard uses: `("text",)`, `("prompt", "completion")` or `()`."""
    if "text" in names:
        return ("text",)
    if {"prompt", "completion"} <= names:
        return ("prompt", "completion")
    if "prompt" in names or "completion" in names:
        raise ShardError("uri", "text rows need both prompt and completion (or a single text field)")
    return ()


def text_rows(texts: dict[str, list[str]], *, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Rows:
    """`Rows` from text columns: `text`, or `text = prompt + completion` with `prompt`."""
    if "prompt" in texts:
        whole = [p + c for p, c in zip(texts["prompt"], texts["completion"], strict=True)]
        return Rows(x=x, y=y, text=whole, prompt=texts["prompt"])
    return Rows(x=x, y=y, text=texts.get("text"))



# --------------------------------------------------------------------------- jsonl
class JsonlReader(ShardReader):
    format = "jsonl"

    def __init__(self, path: Path, *, num_rows: int | None = None) -> None:
        self.path = path
        count, fields = 0, None
        for number, record in self._records():
            if num_rows is not None and count == 1:
                count = num_rows
                break
            keys = (text_columns(set(record)), "y" in record, "id" in record)
            if fields is None:
                fields = keys
            elif keys != fields:
                raise ShardError("uri", f"line {number}: every line needs the same fields (text or prompt/completion, "
                                        "y, id)")
            count += 1
        self.num_rows = count
        texts, has_y, has_id = fields or (("text",), False, False)
        self.text_columns: tuple[str, ...] = texts
        self.columns = set(texts) | ({"y"} if has_y else set()) | ({"ids"} if has_id else set())

    def _records(self, skip: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """`(line number, record)` of every non-empty line after the first `skip` (counted, not parsed:
        a fan-out part starting at row r of a million-row shard does not decode the r lines before it)."""
        with open(self.path, encoding="utf-8") as handle:
            try:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    if skip:
                        skip -= 1
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise ShardError("uri", f"line {number} is not valid JSON") from None
                    if not isinstance(record, dict):
                        raise ShardError("uri", f"line {number} must be a JSON object")
                    names = text_columns(set(record)) if "text" in record or "prompt" in record or "completion" in record else ()
                    if not names or not all(isinstance(record[n], str) for n in names):
                        raise ShardError("uri", f"line {number} needs a string field 'text' (or string fields "
                                                "'prompt' and 'completion')")
                    if "y" in record and (isinstance(record["y"], bool) or not isinstance(record["y"], int | float)):
                        raise ShardError("uri", f"line {number}: y must be a number")
                    if "id" in record and (isinstance(record["id"], bool) or not isinstance(record["id"], str | int)):
                        raise ShardError("uri", f"line {number}: id must be a string or an integer")
                    yield number, record
            except UnicodeDecodeError:
                raise ShardError("uri", "the file is not UTF-8 text") from None

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        texts: dict[str, list[str]] = {name: [] for name in self.text_columns}
        labels: list[float] = []
        with_y = "y" in self.columns
        pending = 0
        for row, (_, record) in enumerate(self._records(skip=start), start=start):
            if row >= stop:
                break
            for name, values in texts.items():
                values.append(record[name])
            if with_y:
                labels.append(record["y"])
            pending += 1
            if pending == chunk:
                yield text_rows(texts, y=np.asarray(labels) if with_y else None)
                texts, labels, pending = {name: [] for name in self.text_columns}, [], 0
        if pending:
            yield text_rows(texts, y=np.asarray(labels) if with_y else None)

    def column(self, name: str) -> list[Any] | None:
        if name != "ids" or "ids" not in self.columns:
            return None
        return [record["id"] for _, record in self._records()]
