"""Large fitted artifacts as files: one directory per (kind, arguments), arrays as `.npy`.

The byte-valued `ArtifactStore` (Redis, or one file per key) suits small values; training
features `[N, d]` of a million rows are gigabytes and must never pass through Redis or be
read whole into memory. A `FeatureFiles` root holds

    <root>/<kind>/<sha256 of the canonical JSON of the arguments>/
        arguments.json      the arguments that made the arrays (human-readable, checked on read)
        <name>.npy          one array per name, float32, read back memory-mapped

An entry is built in a temporary sibling directory (arrays streamed into `.npy` files
opened with `numpy.lib.format.open_memmap`, so a build holds O(batch) rows in memory) and
published by one atomic directory rename: readers see no entry or a complete one. Two
builders racing on the same entry both finish; the first rename wins and the loser's copy
is discarded. Entries depend only on their arguments (content hashes of model and data
included), so they never need invalidation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution.artifacts import canonical_json
from attribution.interrupts import check_interrupt

ARGUMENTS_FILE = "arguments.json"

# Fills the arrays of a new entry inside the given (temporary) directory.
Builder = Callable[["EntryWriter"], None]


class EntryWriter:
    """Creates the `.npy` arrays of an entry being built (`array` returns a writable memmap)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def array(self, name: str, shape: tuple[int, ...]) -> np.memmap:
        """A new float32 array `<name>.npy` of `shape`, memory-mapped for writing."""
        path = self.directory / f"{name}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


class FeatureFiles:
    """The file store of large fitted arrays under `root` (see module docstring).

    `built` and `reused` count entries this instance built and found, per kind.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.built: dict[str, int] = {}
        self.reused: dict[str, int] = {}

    def entry(self, kind: str, arguments: Mapping[str, Any]) -> Path:
        """The directory of the entry for `(kind, arguments)` (which may not exist yet)."""
        canonical = canonical_json(arguments)
        return self.root / kind / hashlib.sha256(canonical.encode()).hexdigest()

    def get_or_build(self, kind: str, arguments: Mapping[str, Any], build: Builder) -> tuple[Path, bool]:
        """`(directory, reused)`: the existing entry, or one built now by `build(writer)`."""
        target = self.entry(kind, arguments)
        if (target / ARGUMENTS_FILE).is_file():
            self.reused[kind] = self.reused.get(kind, 0) + 1
            return target, True
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            build(EntryWriter(staging))
            (staging / ARGUMENTS_FILE).write_text(canonical_json(arguments) + "\n")
            for path in staging.iterdir():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            try:
                os.rename(staging, target)
            except OSError:  # another builder published the same entry first
                if not (target / ARGUMENTS_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.built[kind] = self.built.get(kind, 0) + 1
        return target, False


def read_array(directory: Path, name: str) -> np.ndarray:
    """`<directory>/<name>.npy` memory-mapped copy-on-write: pages are read on demand, nothing
    is copied into memory up front, and a write would stay private (the file never changes)."""
    return np.load(directory / f"{name}.npy", mmap_mode="c", allow_pickle=False)


def streamed_product(query: Tensor, rows: np.ndarray, chunk_rows: int) -> Tensor:
    """`[Q, N]` float32 `query · rowsᵀ` for `query` `[Q, d]` and (memory-mapped) `rows` `[N, d]`,
    reading `chunk_rows` rows at a time: memory O(chunk_rows·d + Q·N)."""
    if rows.ndim != 2 or rows.shape[1] != query.shape[1]:
        raise ValueError(f"rows have shape {tuple(rows.shape)}, the query {tuple(query.shape)}")
    query = query.float()
    out = torch.empty(query.shape[0], rows.shape[0], dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        check_interrupt()  # the caller's cancel / time limit (this loop reports no progress)
        block = torch.from_numpy(rows[start: start + chunk_rows])
        out[:, start: start + block.shape[0]] = query @ block.T
    return out


def read_arguments(directory: Path) -> dict[str, Any]:
    loaded = json.loads((directory / ARGUMENTS_FILE).read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{directory / ARGUMENTS_FILE} is not a JSON object")
    return loaded
