"""Content hashes of model files, model folders, shards and datasets.

`file_sha256` streams a file (`hashlib.file_digest`); `folder_sha256` hashes the sorted `(relative path, file
sha256)` pairs of every regular file under a folder, so renaming or editing any file
changes it. `cached_sha256` remembers the hash per process and file version — an
`lru_cache` keyed by the path and its signature `(device, inode, size, mtime_ns, ctime_ns)`
(of the file, or of every file in the folder) — so a worker re-verifies a registered model or shard on every job (every fan-out
part) without re-reading an unchanged file. Any write to a file changes its mtime and ctime,
and a replaced file has a new inode; a file whose mtime was set back still has a new ctime
(which no user call can set), so a changed file is always hashed again.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

# Hashes remembered per process: enough for every shard of the datasets a worker serves (an
# entry is a few hundred bytes); with fewer, parts sweeping the shards in turn would evict
# each other's hashes and re-read every shard on every job.
MEMO_ENTRIES = 16384


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def folder_sha256(folder: Path) -> str:
    """sha256 over the sorted `relative/path\\0<file sha256>\\n` lines of the folder's files."""
    digest = hashlib.sha256()
    for file in _folder_files(folder):
        relative = file.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def path_sha256(path: Path) -> str:
    """`folder_sha256` for a directory, `file_sha256` for a file."""
    return folder_sha256(path) if path.is_dir() else file_sha256(path)


def dataset_sha256(shard_hashes: list[str]) -> str:
    """A dataset's identity: sha256 of its shards' hashes in order (order matters: it fixes row indices)."""
    return hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()


Signature = tuple[tuple[str, int, int, int, int, int], ...]


def _file_signature(relative: str, stat: os.stat_result) -> tuple[str, int, int, int, int, int]:
    return (relative, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _signature(path: Path) -> Signature:
    """Cheap change detector: `(relative path, device, inode, size, mtime_ns, ctime_ns)` of the
    file or of every file in the folder."""
    if path.is_dir():
        return tuple(_file_signature(file.relative_to(path).as_posix(), file.stat()) for file in _folder_files(path))
    return (_file_signature("", os.stat(path)),)


@lru_cache(maxsize=MEMO_ENTRIES)
def _sha256_of_version(path: str, signature: Signature) -> str:
    """`path_sha256` of one version of a file or folder (its `signature`)."""
    return path_sha256(Path(path))


def cached_sha256(path: Path) -> str:
    """`path_sha256(path)`, re-computed only when the file's signature (see module docstring) changed."""
    return _sha256_of_version(str(path), _signature(path))


def clear_hash_memo() -> None:
    _sha256_of_version.cache_clear()
