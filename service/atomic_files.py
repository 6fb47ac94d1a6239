"""Atomic file writes: readers see a file's old contents or the whole new ones, never a part.

Used for everything the service writes beside its database: artifact files (embedded
artifact store), score vectors and part files of fanned-out queries, group-id files, and
embedded-mode lease files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as out:
        out.write(data)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace `path` atomically when the block ends.

    Writers stream into a temporary file next to `path` (no in-memory copy of the whole
    contents: a score vector `[N]` goes straight to disk), which is fsynced and renamed over
    `path`; on an error the temporary file is removed and `path` is left as it was.
    """
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
