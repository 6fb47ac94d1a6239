"""`file://` URIs → paths inside the operator's data root, and nothing else.

The data root is the only directory users may point the service at. Symlinks are
resolved before the containment check, so neither `..` segments nor a link leading out
of the root can escape it, and the service's own directory (`<root>/.service`: database,
score files, caches) is never addressable.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from service.settings import SERVICE_DIR_NAME
from workers.loading.errors import UriError


def resolve_uri(uri: str, data_root: Path, *, field: str = "uri") -> Path:
    """The existing file or folder a `file://` URI names, checked to lie inside `data_root`.

    Accepts `file:///abs/path` and `file://localhost/abs/path` with percent-encoding.
    Raises `UriError` for other schemes, hosts, relative or missing paths, and anything
    that resolves (after following symlinks) outside `data_root` or inside its `.service` folder.
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
    return path


def path_to_uri(path: Path) -> str:
    """The `file://` URI of an absolute path (for tests and reports)."""
    return path.resolve().as_uri()
