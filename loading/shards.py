"""Training-data shards: validation at registration and a streaming `TrainingSet` over them.

`inspect_shard` checks a shard end to end (structure, equal lengths, finite numbers, no
pickles) and hashes it. `ShardedTrainingSet` is the `attribution.data.TrainingSet` the
methods sweep: global row `i` is position `i` across the shards in registration order;
it reads shard by shard through the format readers (see `readers.py` for how each format
streams), assembles exact `batch_size` batches across shard boundaries (text batches are
further split to at most `token_budget` padded tokens), and prepares the next batch on a
background thread while the model works on the current one. Text rows cut to the model's
context length are recorded (`truncated_rows`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attribution.data import Batch
from attribution.tasks import TaskName
from loading.errors import ShardError
from loading.hashing import cached_sha256, file_sha256
from loading.model_inputs import InputSpec, rows_to_batch, split_by_tokens, text_batch
from loading.readers import SHARD_FORMATS, open_reader
from loading.rows import Rows
from loading.uris import resolve_uri
from service.settings import Settings


@dataclass(frozen=True)
class ShardInfo:
    format: str
    num_samples: int
    sha256: str


def inspect_shard(path: Path) -> ShardInfo:
    """Validate a shard by reading it once; `ShardError` (field `uri`) for every malformed case."""
    fmt = SHARD_FORMATS.get(path.suffix.lower())
    reader = open_reader(path, fmt)
    try:
        seen = 0
        for rows in reader.iter_rows(0, reader.num_rows, 4096):
            for name, values in (("x", rows.x), ("y", rows.y)):
                if values is not None and values.dtype.kind == "f" and not np.isfinite(values).all():
                    raise ShardError("uri", f"{name} has non-finite values (NaN or inf) near row {seen}")
            seen += len(rows)
        if seen != reader.num_rows:
            raise ShardError("uri", f"the shard declares {reader.num_rows} rows but holds {seen}")
        reader.check_integrity()
        for name in ("ids", "group"):
            labels = reader.column(name)
            if labels is not None and len(labels) != reader.num_rows:
                raise ShardError("uri", f"{name} has {len(labels)} entries for {reader.num_rows} rows")
    finally:
        reader.close()
    return ShardInfo(format=reader.format, num_samples=reader.num_rows, sha256=file_sha256(path))


# The optional shard column naming each row's group (a query's `group_by: "group"`).
GROUP_COLUMN = "group"


def shards_without_column(dataset_row: Any, name: str, settings: Settings) -> list[int]:
    """Positions of a registered dataset's shards whose files have no column `name` (e.g.
    `group`); reads only the files' headers (the `.jsonl` reader: its first line)."""
    missing = []
    for shard in dataset_row.shards:
        path = resolve_uri(shard.uri, settings.data_root, field=f"shards[{shard.position}].uri")
        try:
            reader = open_reader(path, shard.format, num_rows=int(shard.num_samples))
        except ShardError as exc:
            raise exc.at(f"shards[{shard.position}].uri") from None
        try:
            if name not in reader.columns:
                missing.append(int(shard.position))
        finally:
            reader.close()
    return missing


@dataclass(frozen=True)
class ShardSpec:
    path: Path
    format: str
    num_samples: int


class ShardedTrainingSet:
    """Rows `[row_start, row_stop)` of the concatenated shards, streamed (a `TrainingSet`).

    `batches(b)` yields `(local_start, Batch)` in global row order, `b` rows per batch except
    the last (text: fewer where `b` rows would exceed `token_budget` padded tokens); local row
    `j` is global row `row_start + j`.
    """

    def __init__(
        self,
        shards: Sequence[ShardSpec | tuple[Path, str, int]],
        *,
        row_start: int = 0,
        row_stop: int | None = None,
        task: TaskName | str,
        tokenizer: Any = None,
        token_inputs: bool | None = None,
        max_length: int | None = None,
        prefetch: bool = True,
        token_budget: int = 16384,
    ) -> None:
        self.shards = [s if isinstance(s, ShardSpec) else ShardSpec(Path(s[0]), s[1], int(s[2])) for s in shards]
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard.num_samples)
        total = self.offsets[-1]
        stop = total if row_stop is None else row_stop
        if not 0 <= row_start <= stop <= total:
            raise ValueError(f"row range [{row_start}, {stop}) is outside the dataset's {total} rows")
        self.row_start, self.row_stop = row_start, stop
        task_name = TaskName(task)
        self.spec = InputSpec(
            task=task_name,
            token_inputs=task_name == TaskName.CAUSAL_LM if token_inputs is None else token_inputs,
            tokenizer=tokenizer, max_length=max_length,
        )
        self.prefetch = prefetch
        self.token_budget = token_budget
        self._truncated: np.ndarray | None = None  # [len] bool, allocated by the first text batch
        self._tokenized: np.ndarray | None = None  # [len] bool: rows whose truncation is known

    def truncated_rows(self) -> int:
        """Text rows of the range longer than `max_length` tokens, whose tail was cut.

        Known from the sweeps so far; rows no sweep has tokenized yet (a method that served
        its training-side features from the store) are tokenized now, without the model.
        """
        if self.spec.tokenizer is None or self.spec.max_length is None:
            return 0
        if self._tokenized is None or not self._tokenized.all():
            for _ in self._batches(self.token_budget):
                pass
        return 0 if self._truncated is None else int(self._truncated.sum())

    def text_extras(self) -> dict[str, int]:
        """What a result reports about tokenization: `max_length` and `truncated_rows` (text only)."""
        if self.spec.tokenizer is None or self.spec.max_length is None:
            return {}
        return {"max_length": self.spec.max_length, "truncated_rows": self.truncated_rows()}

    @classmethod
    def for_dataset(
        cls, dataset_row: Any, spec: InputSpec, settings: Settings, *,
        row_start: int = 0, row_stop: int | None = None, verify: bool = True, prefetch: bool = True,
    ) -> ShardedTrainingSet:
        """The training set of a registered dataset.

        Shard files inside the row range are checked against their registered sha256 (hashed
        once per process and file version, see `cached_sha256`); the others are only resolved.
        """
        specs = []
        stop = dataset_row.num_samples if row_stop is None else row_stop
        offset = 0
        for shard in dataset_row.shards:
            field = f"shards[{shard.position}].uri"
            path = resolve_uri(shard.uri, settings.data_root, field=field)
            in_range = offset < stop and offset + int(shard.num_samples) > row_start
            offset += int(shard.num_samples)
            if verify and in_range and cached_sha256(path) != shard.sha256:
                raise ShardError(field, "shard file changed since the dataset was registered; register it again")
            specs.append(ShardSpec(path, shard.format, int(shard.num_samples)))
        return cls(specs, row_start=row_start, row_stop=row_stop, task=spec.task, tokenizer=spec.tokenizer,
                   token_inputs=spec.token_inputs, max_length=spec.max_length, prefetch=prefetch,
                   token_budget=settings.token_budget)

    def __len__(self) -> int:
        return self.row_stop - self.row_start

    # ------------------------------------------------------------------ streaming
    def batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        stream = self._batches(batch_size)
        return _prefetched(stream) if self.prefetch else stream

    def _batches(self, batch_size: int) -> Iterator[tuple[int, Batch]]:
        pending: list[Rows] = []
        count = emitted = 0
        for rows in self._rows(batch_size):
            pending.append(rows)
            count += len(rows)
            while count >= batch_size:
                merged = Rows.concat(pending)
                yield from self._encoded(emitted, merged.slice(0, batch_size))
                emitted += batch_size
                count -= batch_size
                pending = [merged.slice(batch_size, batch_size + count)] if count else []
        if count:
            yield from self._encoded(emitted, Rows.concat(pending))

    def _encoded(self, start: int, rows: Rows) -> Iterator[tuple[int, Batch]]:
        """Rows from local index `start` as batches; text is tokenized, its truncation recorded."""
        if rows.text is None:
            yield start, rows_to_batch(rows, self.spec)
            return
        encoded = text_batch(rows, self.spec)
        if self._truncated is None or self._tokenized is None:
            self._truncated, self._tokenized = np.zeros(len(self), dtype=bool), np.zeros(len(self), dtype=bool)
        self._truncated[start: start + len(rows)] = encoded.truncated
        self._tokenized[start: start + len(rows)] = True
        for offset, piece in split_by_tokens(encoded.batch, self.token_budget):
            yield start + offset, piece

    def _rows(self, chunk: int) -> Iterator[Rows]:
        """Raw row chunks of the range, shard by shard."""
        for position, shard in enumerate(self.shards):
            lo = max(self.row_start, self.offsets[position]) - self.offsets[position]
            hi = min(self.row_stop, self.offsets[position + 1]) - self.offsets[position]
            if hi <= lo:
                continue
            reader = open_reader(shard.path, shard.format, num_rows=shard.num_samples)
            try:
                if reader.num_rows != shard.num_samples:
                    raise ShardError(f"shards[{position}].uri", f"the shard now has {reader.num_rows} rows, "
                                     f"{shard.num_samples} were registered")
                yield from reader.iter_rows(lo, hi, chunk)
            finally:
                reader.close()

    def rows_at(self, rows: Sequence[int]) -> Rows:
        """Raw rows at the given global indices, in that order (few rows: query refs)."""
        parts: list[Rows] = []
        for row, position in zip(rows, self.shard_of_row(rows), strict=True):
            shard = self.shards[position]
            local = row - self.offsets[position]
            reader = open_reader(shard.path, shard.format, num_rows=shard.num_samples)
            try:
                parts.extend(reader.iter_rows(local, local + 1, 1))
            finally:
                reader.close()
        if len(parts) != len(rows):
            raise ShardError("shards", "a shard holds fewer rows than registered")
        return Rows.concat(parts)

    # ------------------------------------------------------------------ row metadata
    def shard_of_row(self, rows: Sequence[int]) -> list[int]:
        """Shard position of each global row index."""
        out = []
        for row in rows:
            if not 0 <= row < self.offsets[-1]:
                raise IndexError(f"row {row} is outside the dataset")
            out.append(bisect.bisect_right(self.offsets, row) - 1)
        return out

    def sample_ids(self, rows: Sequence[int]) -> list[str | None]:
        """The shard's `ids` entry of each global row (as a string), `None` where the shard has none.

        Each shard holding a requested row has its `ids` read once per call and only the
        requested entries are kept: a ranking touches most shards, so keeping whole columns
        would hold every row's id in memory.
        """
        wanted: dict[int, list[int]] = {}
        for row, position in zip(rows, self.shard_of_row(rows), strict=True):
            wanted.setdefault(position, []).append(row)
        found: dict[int, str | None] = {}
        for position, shard_rows in wanted.items():
            ids = self._column(position, "ids")
            for row in shard_rows:
                found[row] = None if ids is None else _as_label(ids[row - self.offsets[position]])
        return [found[row] for row in rows]

    def texts_at(self, rows: Sequence[int]) -> list[str | None]:
        """The text of each global row (prompt + completion for instruction rows); `None` for
        rows of shards without text. Each shard is read once, from its first to its last
        requested row (a ranking asks for a few rows: top and bottom k)."""
        wanted: dict[int, list[int]] = {}
        for row, position in zip(rows, self.shard_of_row(rows), strict=True):
            wanted.setdefault(position, []).append(row)
        found: dict[int, str | None] = {}
        for position, shard_rows in wanted.items():
            shard, base = self.shards[position], self.offsets[position]
            lo, hi = min(shard_rows) - base, max(shard_rows) - base + 1
            reader = open_reader(shard.path, shard.format, num_rows=shard.num_samples)
            try:
                texts: list[str] = []
                for chunk in reader.iter_rows(lo, hi, 4096):
                    if chunk.text is None:
                        break
                    texts.extend(chunk.text)
            finally:
                reader.close()
            for row in shard_rows:
                found[row] = texts[row - base - lo] if texts else None
        return [found[row] for row in rows]

    def column_values(self, name: str) -> list[str | None]:
        """A per-row label column (`group`, `ids`) over the set's range, `None` for shards without it."""
        out: list[str | None] = []
        for position in range(len(self.shards)):
            lo = max(self.row_start, self.offsets[position])
            hi = min(self.row_stop, self.offsets[position + 1])
            if hi <= lo:
                continue
            values = self._column(position, name)
            start = lo - self.offsets[position]
            out.extend([None] * (hi - lo) if values is None
                       else [_as_label(v) for v in values[start:start + hi - lo]])
        return out

    def _column(self, position: int, name: str) -> list[Any] | None:
        """Shard `position`'s whole column `name` (read on every call, not kept)."""
        shard = self.shards[position]
        reader = open_reader(shard.path, shard.format, num_rows=shard.num_samples)
        try:
            return reader.column(name)
        finally:
            reader.close()


def _as_label(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


_END = object()


def _prefetched(stream: Iterator[Any]) -> Iterator[Any]:
    """Read `stream` one item ahead of the consumer on a worker thread (the next chunk is read
    and decoded while the consumer computes on this one); its errors re-raise in the consumer."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch") as pool:
        pending = pool.submit(next, stream, _END)
        try:
            while (item := pending.result()) is not _END:
                pending = pool.submit(next, stream, _END)
                yield item
        finally:
            wait([pending])  # the stream is idle: it can be closed from this thread
            if hasattr(stream, "close"):
                stream.close()
