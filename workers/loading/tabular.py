"""Row readers for the tabular shard formats: `.parquet` (pyarrow, row group by row group)
and `.jsonl` (one JSON object per line with a `text` field, optional `y` and `id`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from workers.loading.errors import ShardError
from workers.loading.readers import COLUMNS, Rows, ShardReader


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
        if not ({"x", "y"} <= names or "text" in names):
            raise ShardError("uri", f"parquet shard needs columns x and y, or text (found: {', '.join(sorted(names)) or 'none'})")
        self.num_rows = int(self.file.metadata.num_rows)
        self.data_columns = [c for c in ("x", "y", "text") if c in self.columns]
        if "text" in self.columns and "x" in self.columns:
            self.data_columns.remove("x")

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
            yield Rows(
                x=_arrow_numeric(part.column("x"), "x") if "x" in self.data_columns else None,
                y=_arrow_numeric(part.column("y"), "y") if "y" in self.data_columns else None,
                text=_arrow_text(part.column("text")) if "text" in self.data_columns else None,
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


def _arrow_text(array: Any) -> list[str]:
    import pyarrow as pa

    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ShardError("uri", f"column text must hold strings, not {array.type}")
    if array.null_count:
        raise ShardError("uri", "column text has missing values")
    return array.to_pylist()



# --------------------------------------------------------------------------- jsonl
class JsonlReader(ShardReader):
    format = "jsonl"

    def __init__(self, path: Path, *, num_rows: int | None = None) -> None:
        self.path = path
        count, has_y, has_id = 0, None, None
        for number, record in self._records():
            if num_rows is not None and count == 1:
                count = num_rows
                break
            keys = ("y" in record, "id" in record)
            if has_y is None:
                has_y, has_id = keys
            elif keys != (has_y, has_id):
                raise ShardError("uri", f"line {number}: every line needs the same fields (y / id present on some lines only)")
            count += 1
        self.num_rows = count
        self.columns = {"text"} | ({"y"} if has_y else set()) | ({"ids"} if has_id else set())

    def _records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, encoding="utf-8") as handle:
            try:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise ShardError("uri", f"line {number} is not valid JSON") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ShardError("uri", f"line {number} needs a string field 'text'")
                    if "y" in record and (isinstance(record["y"], bool) or not isinstance(record["y"], int | float)):
                        raise ShardError("uri", f"line {number}: y must be a number")
                    if "id" in record and (isinstance(record["id"], bool) or not isinstance(record["id"], str | int)):
                        raise ShardError("uri", f"line {number}: id must be a string or an integer")
                    yield number, record
            except UnicodeDecodeError:
                raise ShardError("uri", "the file is not UTF-8 text") from None

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        texts: list[str] = []
        labels: list[float] = []
        with_y = "y" in self.columns
        for row, (_, record) in enumerate(self._records()):
            if row < start:
                continue
            if row >= stop:
                break
            texts.append(record["text"])
            if with_y:
                labels.append(record["y"])
            if len(texts) == chunk:
                yield Rows(text=texts, y=np.asarray(labels) if with_y else None)
                texts, labels = [], []
        if texts:
            yield Rows(text=texts, y=np.asarray(labels) if with_y else None)

    def column(self, name: str) -> list[Any] | None:
        if name != "ids" or "ids" not in self.columns:
            return None
        return [record["id"] for _, record in self._records()]
