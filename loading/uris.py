"""`file://` URIs → paths inside the operator's data root, and nothing else.

The data root is the only directory users may point the service at. Symlinks are
resolved before the containment check, so neither `..` segments nor a link leading out
of the root can escape it, and the service's own directory (`<root>/.service`: database,
score files, caches) is never addressable.
"""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from loading.errors import UriError
from service.settings import SERVICE_DIR_NAME


def resolve_uri(uri: str, data_root: Path, *, field: str = "uri") -> Path:
    """The existing file or folder a `file://` URI names, checked to lie inside `data_root`.

    Accepts `file:///abs/path` and `file://localhost/abs/path` with percent-encoding.
    Raises `UriError` for other schemes, hosts, relative or missing paths, anything that
    resolves (after following symlinks) outside `data_root` or inside its `.service` folder,
    and anything that is not a regular file or a folder of regular files and folders (a
    named pipe, socket or device: opening a pipe would block).
    """
    if not isinstance(uri, str) or not uri:
        raise UriError(field, "must be a non-empty file:// URI")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme != "file":
        shown = scheme or "none (a bare path)"
        raise UriError(field, f"URI scheme {shown!r} is not supported; use file:// under the data root")
    if parts.netloc not in ("", "localhost"):
        raise UriError(field, f"file URIs must not name a host ({parts.netloc!r}); use file:///path")
    if parts.query or parts.fragment:
        raise UriError(field, "file URIs must not have a query or fragment")
    raw_path = unquote(parts.path)
    if "\x00" in raw_path:
        raise UriError(field, "the path contains a NUL character")
    if not raw_path.startswith("/"):
        raise UriError(field, "the path must be absolute (file:///...)")
    root = data_root.resolve()
    try:
        path = Path(raw_path).resolve(strict=True)
    except FileNotFoundError:
        raise UriError(field, f"no such file: {raw_path}") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission problems
        raise UriError(field, f"cannot resolve {raw_path}: {exc.__class__.__name__}") from None
    if not path.is_relative_to(root):
        raise UriError(field, "the path resolves outside the server's data root")
    if path.is_relative_to(root / SERVICE_DIR_NAME):
        raise UriError(field, "the path points into the service's private directory")
    _check_file_kind(path, field)
    return path


def _check_file_kind(path: Path, field: str) -> None:
    """A regular file, or a folder whose entries are all regular files or folders.

    Only `stat` is used, which never blocks: opening a named pipe (FIFO) blocks until a writer
    appears, and a device or socket is no model or shard, so any such file is refused before
    anything opens it.
    """
    kind = _kind(path)
    if kind == "folder":
        try:
            entries = sorted(path.iterdir())
        except OSError as exc:
            raise UriError(field, f"cannot list the folder {path.name}: {exc.__class__.__name__}") from None
        for entry in entries:
            if _kind(entry) not in ("file", "folder"):
                raise UriError(field, f"the folder holds {entry.name}, which is a {_kind(entry)}, "
                                      "not a regular file")
    elif kind != "file":
        raise UriError(field, f"the path is a {kind}, not a regular file or folder")


def _kind(path: Path) -> str:
    """`file`, `folder`, `named pipe`, `socket`, `device` or `special file` (symlinks followed)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "broken link"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def path_to_uri(path: Path) -> str:
    """The `file://` URI of an absolute path (for tests and reports)."""
    return path.resolve().as_uri()
