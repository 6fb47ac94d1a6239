"""`params.optimizer_state` (TrackStar): a `file://` URI of a safetensors file of Adam
`exp_avg_sq` tensors keyed by parameter name, under the data root.

The API checks it at submission (`optimizer_state_sha256`: the URI resolves inside the data
root to a `.safetensors` file whose header reads; its sha256 joins the request hash, so a
changed file is never answered from an earlier result); the job loads it
(`load_second_moment`) into `FitContext.second_moment`. Names and shapes are checked
against the model by the method (`attribution.optimizer_state.SecondMoment.flat`).
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from attribution.optimizer_state import OptimizerStateError, SecondMoment
from loading.errors import LoadError
from loading.hashing import cached_sha256
from loading.uris import resolve_uri

FIELD = "params.optimizer_state"


def _checked_path(uri: str, data_root: Path) -> Path:
    path = resolve_uri(uri, data_root, field=FIELD)
    if not path.is_file() or path.suffix != ".safetensors":
        raise LoadError(FIELD, "must name a .safetensors file of {parameter name: exp_avg_sq tensor}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            if not list(handle.keys()):
                raise LoadError(FIELD, "the safetensors file holds no tensor")
    except (SafetensorError, OSError) as exc:
        raise LoadError(FIELD, f"cannot read the file as safetensors: {exc}") from None
    return path


def optimizer_state_sha256(uri: str, data_root: Path) -> str:
    """sha256 of the file `uri` names, after checking it (raises `LoadError` naming the field)."""
    return cached_sha256(_checked_path(uri, data_root))


def load_second_moment(uri: str, data_root: Path) -> SecondMoment:
    """The second-moment tensors of the file `uri` names (raises `LoadError` naming the field)."""
    path = _checked_path(uri, data_root)
    try:
        return SecondMoment.from_safetensors(path, cached_sha256(path))
    except OptimizerStateError as exc:
        raise LoadError(FIELD, str(exc)) from None
