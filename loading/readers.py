"""Row readers for the shard formats: `.npz`, `.parquet`, `.pt` (safetensors or tensor dict), `.jsonl`.

Each reader opens one shard, checks its structure, and streams rows `[start, stop)` as
`Rows` chunks of at most `chunk` rows, so a training sweep holds one chunk per shard in
memory, never a whole shard:
- `.npz`: every array is a `.npy` member of a zip. `np.load(mmap_mode=...)` cannot map
  them, so the reader parses each member's `.npy` header and reads raw row bytes chunk by
  chunk: at the member's file offset when it is stored uncompressed (what `numpy.savez`
  writes: a row range seeks straight to its first row), through the member's zip stream
  when it is deflated (`savez_compressed`). No copy is written to disk, nothing is
  unpickled (object dtypes are refused); registration also tests every member's CRC.
  Fortran-ordered multi-dimensional arrays cannot be read row by row; they are read whole.
- `.parquet`: `pyarrow` `iter_batches` over the row groups that overlap the range (`tabular.py`).
- `.pt`: a safetensors file (lazy slices through `safe_open`) or a `torch.save` tensor dict
  read with `weights_only=True` and `mmap=True` (tensors only; Python objects are refused).
- `.jsonl`: one JSON object per non-empty line with a `text` field, or `prompt` and
  `completion` fields (instruction data: the loss counts the completion only), optional `y`,
  `id` (`tabular.py`).
"""

from __future__ import annotations

import contextlib
import math
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from loading.errors import ShardError
from loading.rows import COLUMNS, TEXT_COLUMNS, Rows, ShardReader
from loading.tabular import JsonlReader, ParquetReader

SHARD_FORMATS = {".npz": "npz", ".parquet": "parquet", ".pt": "pt", ".safetensors": "pt", ".jsonl": "jsonl"}
def open_reader(path: Path, format: str | None = None, *, num_rows: int | None = None) -> ShardReader:
    """The reader for a shard file; the format comes from the extension unless given.

    `num_rows` (the registered row count) lets the `.jsonl` reader skip its counting pass.
    """
    fmt = format or SHARD_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ShardError("uri", f"unsupported shard extension {path.suffix or '(none)'!r}; "
                                f"use one of {', '.join(sorted(SHARD_FORMATS))}")
    if not path.is_file():
        raise ShardError("uri", "a shard must be a regular file")
    if fmt == "jsonl":
        return JsonlReader(path, num_rows=num_rows)
    readers: dict[str, type[NpzReader | ParquetReader | PtReader]] = {"npz": NpzReader, "parquet": ParquetReader, "pt": PtReader}
    return readers[fmt](path)


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise ShardError("uri", f"array {name} holds Python objects (pickles are refused); store numbers or fixed-width strings")
    if name in ("x", "y") and dtype.kind not in "biuf":
        raise ShardError("uri", f"array {name} must be numeric, not {dtype}")
    if name in ("ids", "group") and dtype.kind not in "biuSU":
        raise ShardError("uri", f"array {name} must hold integers or strings, not {dtype}")


# --------------------------------------------------------------------------- npz
@dataclass
class _NpyMember:
    name: str
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    data_offset: int | None = None  # file offset of row 0 when the member is stored uncompressed

    @property
    def row_bytes(self) -> int:
        return int(self.dtype.itemsize * math.prod(self.shape[1:]))


def _stored_data_offset(handle: IO[bytes], info: zipfile.ZipInfo, header_bytes: int, data_bytes: int) -> int | None:
    """File offset of a stored (uncompressed) member's array data, or None if it is deflated.

    The member starts after its local file header (30 bytes + name + extra field, whose
    lengths may differ from the central directory's); the `.npy` header is `header_bytes`
    long. `ShardError` if the array data run past the member's end.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    handle.seek(info.header_offset)
    local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ShardError("uri", f"member {info.filename} has a corrupt local header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    if header_bytes + data_bytes > info.file_size:
        raise ShardError("uri", f"array {info.filename.removesuffix('.npy')} is truncated")
    return start + header_bytes


def _read_npy_header(stream: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise ShardError("uri", f"member {name} is not a valid .npy array: {exc}") from None
    raise ShardError("uri", f"member {name} uses unsupported .npy format version {version}")


class NpzReader(ShardReader):
    """`.npz` rows. Members `numpy.savez` stores uncompressed are read at their file offset
    (a range starting at row r seeks straight to it; no CRC pass: the job checks the whole
    file's sha256 before reading, and `check_integrity` tests every CRC at registration);
    deflated members (`savez_compressed`) stream through `zipfile`."""

    format = "npz"

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError):
            raise ShardError("uri", "not a valid .npz file (expected the zip written by numpy.savez)") from None
        self.members: dict[str, _NpyMember] = {}
        for info in self.archive.infolist():
            key = info.filename.removesuffix(".npy")
            if key not in COLUMNS or key in TEXT_COLUMNS:
                continue
            with self.archive.open(info) as stream:
                shape, fortran, dtype = _read_npy_header(stream, info.filename)
                header_bytes = stream.tell()
            _check_dtype(key, dtype)
            if len(shape) == 0:
                raise ShardError("uri", f"array {key} is a scalar; it needs one entry per row")
            member = _NpyMember(info.filename, tuple(shape), bool(fortran), dtype)
            if self.archive.fp is not None:
                member.data_offset = _stored_data_offset(self.archive.fp, info, header_bytes,
                                                         shape[0] * member.row_bytes)
            self.members[key] = member
        self.columns = set(self.members)
        if "x" not in self.members or "y" not in self.members:
            found = ", ".join(sorted(self.members)) or "none"
            raise ShardError("uri", f".npz shard needs arrays x and y (found: {found})")
        self._check_lengths({k: m.shape[0] for k, m in self.members.items()})

    def _stream(self, key: str, start: int, stop: int, chunk: int) -> Iterator[np.ndarray]:
        member = self.members[key]
        if member.fortran and len(member.shape) > 1:
            whole = self._whole(key)
            for s in range(start, stop, chunk):
                yield whole[s:min(s + chunk, stop)]
            return
        with contextlib.ExitStack() as stack:
            if member.data_offset is not None:
                stream: IO[bytes] = stack.enter_context(open(self.path, "rb"))
                stream.seek(member.data_offset + start * member.row_bytes)
            else:
                stream = stack.enter_context(self.archive.open(member.name))
                _read_npy_header(stream, member.name)
                _skip(stream, start * member.row_bytes)
            for s in range(start, stop, chunk):
                count = min(chunk, stop - s)
                raw = stream.read(count * member.row_bytes)
                if len(raw) != count * member.row_bytes:
                    raise ShardError("uri", f"array {key} is truncated")
                yield np.frombuffer(raw, dtype=member.dtype).reshape((count, *member.shape[1:]))

    def _whole(self, key: str) -> np.ndarray:
        with self.archive.open(self.members[key].name) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        for x, y in zip(self._stream("x", start, stop, chunk), self._stream("y", start, stop, chunk), strict=True):
            yield Rows(x=x, y=y)

    def column(self, name: str) -> list[Any] | None:
        if name not in self.members:
            return None
        return self._whole(name).tolist()

    def check_integrity(self) -> None:
        bad = self.archive.testzip()
        if bad is not None:
            raise ShardError("uri", f"member {bad} fails its CRC check (the archive is corrupt)")

    def close(self) -> None:
        self.archive.close()


def _skip(stream: IO[bytes], nbytes: int) -> None:
    while nbytes > 0:
        got = len(stream.read(min(nbytes, 1 << 22)))
        if got == 0:
            raise ShardError("uri", "array data ends early")
        nbytes -= got


# --------------------------------------------------------------------------- pt
def is_safetensors_file(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size <= path.stat().st_size - 8 and head[8:9] == b"{"


class PtReader(ShardReader):
    format = "pt"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.safe = is_safetensors_file(path)
        if self.safe:
            from safetensors import safe_open

            try:
                self.handle: Any = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise ShardError("uri", f"not a valid safetensors file: {exc.__class__.__name__}") from None
            keys = set(self.handle.keys())
            lengths = {k: int(self.handle.get_slice(k).get_shape()[0]) for k in keys & set(COLUMNS) if self.handle.get_slice(k).get_shape()}
        else:
            self.tensors = _torch_load_tensors(path)
            keys = set(self.tensors)
            lengths = {k: int(v.shape[0]) for k, v in self.tensors.items() if k in COLUMNS and v.dim() > 0}
        if keys & set(TEXT_COLUMNS):
            raise ShardError("uri", ".pt shards hold tensors only; put text in .jsonl or .parquet")
        self.columns = keys & set(COLUMNS)
        if not {"x", "y"} <= self.columns:
            raise ShardError("uri", f".pt shard needs tensors x and y (found: {', '.join(sorted(keys)) or 'none'})")
        for key in self.columns:
            if key not in lengths:
                raise ShardError("uri", f"tensor {key} is a scalar; it needs one entry per row")
            _check_tensor_dtype(key, self._slice(key, 0, 0).dtype)
        self._check_lengths(lengths)

    def _slice(self, key: str, start: int, stop: int) -> Any:
        if self.safe:
            return self.handle.get_slice(key)[start:stop]
        return self.tensors[key][start:stop]

    def iter_rows(self, start: int, stop: int, chunk: int) -> Iterator[Rows]:
        for s in range(start, stop, chunk):
            e = min(s + chunk, stop)
            yield Rows(x=self._numpy("x", s, e), y=self._numpy("y", s, e))

    def _numpy(self, key: str, start: int, stop: int) -> np.ndarray:
        value = self._slice(key, start, stop)
        if value.dtype.is_floating_point and value.dtype not in (_torch().float32, _torch().float64):
            value = value.float()  # bf16/fp16 have no exact numpy twin
        return value.contiguous().numpy()

    def column(self, name: str) -> list[Any] | None:
        if name not in self.columns:
            return None
        return self._slice(name, 0, self.num_rows).tolist()


def _check_tensor_dtype(name: str, dtype: Any) -> None:
    if dtype.is_complex:
        raise ShardError("uri", f"tensor {name} must be real-valued, not {dtype}")
    if name in ("ids", "group") and dtype.is_floating_point:
        raise ShardError("uri", f"tensor {name} must hold integers, not {dtype}")


def _torch() -> Any:
    import torch

    return torch


def _torch_load_tensors(path: Path) -> dict[str, Any]:
    torch = _torch()
    if not zipfile.is_zipfile(path):
        raise ShardError("uri", ".pt shard must be a safetensors file or a torch.save tensor dict (zip format)")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ShardError("uri", f".pt shard does not load as plain tensors (Python objects are refused): "
                                f"{exc.__class__.__name__}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise ShardError("uri", ".pt shard must be a dict of named tensors (x, y, optional ids)")
    return loaded
