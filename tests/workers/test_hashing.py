"""The per-process hash memo (`loading.hashing`): an unchanged file is read once, any
change to it — even one that keeps its size and mtime — is hashed again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loading import hashing


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path `path_sha256` actually reads, in order."""
    seen: list[Path] = []
    real = hashing.path_sha256

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "path_sha256", counting)
    hashing.clear_hash_memo()
    return seen


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_unchanged_file_is_read_once(tmp_path: Path, reads: list[Path]) -> None:
    path = tmp_path / "shard.npz"
    path.write_bytes(b"a" * 1000)
    assert [hashing.cached_sha256(path) for _ in range(5)] == [_sha(b"a" * 1000)] * 5
    assert reads == [path]


def test_same_size_and_restored_mtime_is_still_hashed_again(tmp_path: Path, reads: list[Path]) -> None:
    path = tmp_path / "shard.npz"
    path.write_bytes(b"a" * 1000)
    hashing.cached_sha256(path)
    before = path.stat()
    with open(path, "r+b") as handle:  # edit in place, then set the mtime back
        handle.write(b"b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert hashing.cached_sha256(path) == _sha(b"b" + b"a" * 999)
    assert reads == [path, path]


def test_a_replaced_file_with_the_same_size_and_mtime_is_hashed_again(tmp_path: Path, reads: list[Path]) -> None:
    path, other = tmp_path / "shard.npz", tmp_path / "new.npz"
    path.write_bytes(b"a" * 1000)
    other.write_bytes(b"c" * 1000)
    hashing.cached_sha256(path)
    stat = path.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, path)  # new inode, same size and mtime
    assert hashing.cached_sha256(path) == _sha(b"c" * 1000)
    assert reads == [path, path]


def test_a_folder_is_hashed_again_when_one_of_its_files_changes(tmp_path: Path, reads: list[Path]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    first = hashing.cached_sha256(folder)
    assert hashing.cached_sha256(folder) == first and reads == [folder]
    (folder / "config.json").write_text("[]")
    assert hashing.cached_sha256(folder) not in (first, None) and reads == [folder, folder]


def test_the_memo_holds_more_files_than_a_large_dataset_has_shards(tmp_path: Path, reads: list[Path]) -> None:
    paths = [tmp_path / f"s{i}.npz" for i in range(4)]
    for path in paths:
        path.write_bytes(path.name.encode())
    for _ in range(3):  # parts sweeping the shards in turn
        for path in paths:
            hashing.cached_sha256(path)
    assert reads == paths
    info = hashing._sha256_of_version.cache_info()
    assert info.maxsize is not None and info.maxsize >= 10_000
