"""`resolve_uri`: only existing paths under the data root, never its `.service` folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loading import UriError, resolve_uri


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "m.pt").write_bytes(b"x")
    (data / "with space.npz").write_bytes(b"x")
    (data / ".service").mkdir()
    (data / ".service" / "attribution.db").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("secret")
    return data


def test_file_uri_inside_root_resolves(root: Path) -> None:
    assert resolve_uri(f"file://{root}/models/m.pt", root) == (root / "models" / "m.pt").resolve()
    assert resolve_uri(f"file://localhost{root}/models/m.pt", root) == (root / "models" / "m.pt").resolve()


def test_percent_encoding_is_decoded(root: Path) -> None:
    assert resolve_uri(f"file://{root}/with%20space.npz", root).name == "with space.npz"


@pytest.mark.parametrize("suffix", ["/../secret.txt", "/models/../../secret.txt", "/%2E%2E/secret.txt"])
def test_dot_dot_traversal_is_refused(root: Path, suffix: str) -> None:
    with pytest.raises(UriError, match="outside the server's data root") as info:
        resolve_uri(f"file://{root}{suffix}", root)
    assert info.value.field == "uri"


def test_symlink_leading_out_of_root_is_refused(root: Path) -> None:
    os.symlink(root.parent / "secret.txt", root / "link.txt")
    with pytest.raises(UriError, match="outside"):
        resolve_uri(f"file://{root}/link.txt", root)


def test_symlinked_directory_out_of_root_is_refused(root: Path) -> None:
    os.symlink(root.parent, root / "escape")
    with pytest.raises(UriError, match="outside"):
        resolve_uri(f"file://{root}/escape/secret.txt", root)


def test_service_dir_is_not_addressable(root: Path) -> None:
    with pytest.raises(UriError, match="private directory"):
        resolve_uri(f"file://{root}/.service/attribution.db", root)
    os.symlink(root / ".service" / "attribution.db", root / "db-link")
    with pytest.raises(UriError, match="private directory"):
        resolve_uri(f"file://{root}/db-link", root)


@pytest.mark.parametrize("uri,scheme", [
    ("s3://bucket/model.pt", "s3"), ("http://example.com/m.pt", "http"), ("https://example.com/m.pt", "https"),
    ("/data/models/m.pt", "none"), ("ftp://host/m.pt", "ftp"),
])
def test_other_schemes_are_refused_by_name(root: Path, uri: str, scheme: str) -> None:
    with pytest.raises(UriError, match=scheme):
        resolve_uri(uri, root)


def test_hosts_relative_paths_and_missing_files_are_refused(root: Path) -> None:
    with pytest.raises(UriError, match="host"):
        resolve_uri(f"file://otherhost{root}/models/m.pt", root)
    with pytest.raises(UriError, match="no such file"):
        resolve_uri(f"file://{root}/models/absent.pt", root)
    with pytest.raises(UriError, match="absolute"):
        resolve_uri("file:relative/path.pt", root)
    with pytest.raises(UriError):
        resolve_uri("", root)


def test_error_field_can_be_readdressed(root: Path) -> None:
    with pytest.raises(UriError) as info:
        resolve_uri("s3://b/k", root, field="shards[1].uri")
    assert info.value.field == "shards[1].uri"
    assert str(info.value).startswith("shards[1].uri: ")
