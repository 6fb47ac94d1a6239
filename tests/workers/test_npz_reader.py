"""`.npz` shards read at their members' file offsets: every row range, archives with extra
fields, deflated archives, and the integrity checks that replace the per-read CRC."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from loading import ShardError, inspect_shard
from loading.readers import NpzReader

RNG = np.random.default_rng(3)
X = RNG.normal(size=(37, 4)).astype(np.float32)
Y = RNG.integers(0, 5, size=37).astype(np.int64)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _rows(path: Path, start: int, stop: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    reader = NpzReader(path)
    try:
        parts = list(reader.iter_rows(start, stop, chunk))
    finally:
        reader.close()
    return np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])


def _zip_with_extra_fields(path: Path) -> None:
    """A stored archive whose local headers carry an extra field (so the data start later)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("x.npy", X), ("y.npy", Y)):
            info = zipfile.ZipInfo(name)
            info.extra = b"\x99\x99\x05\x00extra"
            archive.writestr(info, _npy(array))


@pytest.mark.parametrize("write", [
    lambda p: np.savez(p, x=X, y=Y),
    lambda p: np.savez_compressed(p, x=X, y=Y),
    _zip_with_extra_fields,
], ids=["stored", "deflated", "extra-fields"])
@pytest.mark.parametrize("start,stop,chunk", [(0, 37, 8), (5, 37, 4), (13, 14, 1), (20, 36, 100)])
def test_every_row_range_reads_the_stored_rows(tmp_path: Path, write: object, start: int, stop: int, chunk: int) -> None:
    path = tmp_path / "s.npz"
    write(path)  # type: ignore[operator]
    x, y = _rows(path, start, stop, chunk)
    np.testing.assert_array_equal(x, X[start:stop])
    np.testing.assert_array_equal(y, Y[start:stop])


def test_a_stored_member_shorter_than_its_header_says_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("x.npy", _npy(X)[:-4 * X.shape[1] * 3])  # three rows missing
        archive.writestr("y.npy", _npy(Y))
    with pytest.raises(ShardError, match="array x is truncated"):
        NpzReader(path)


def test_registration_tests_the_crc_the_sweep_skips(tmp_path: Path) -> None:
    big_x = RNG.normal(size=(4000, 4)).astype(np.float32)  # larger than zipfile's read-ahead
    big_y = RNG.integers(0, 5, size=4000).astype(np.int64)
    path = tmp_path / "rot.npz"
    np.savez(path, x=big_x, y=big_y)
    data = bytearray(path.read_bytes())
    data[data.index(big_x[-1].tobytes())] ^= 0x01  # a byte of x's last row
    path.write_bytes(bytes(data))
    x, _ = _rows(path, 0, 4000, 1000)  # rows are read as stored (the job checks the file's sha256 first)
    assert np.array_equal(x[:-1], big_x[:-1]) and not np.array_equal(x[-1], big_x[-1])
    with pytest.raises(ShardError, match=r"member x\.npy fails its CRC check"):
        inspect_shard(path)
