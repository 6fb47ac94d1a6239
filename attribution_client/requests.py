"""Request bodies and response decoding shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attribution_client.models import Dataset, Model

SAMPLE_FIELDS = ("x", "y", "text", "prompt", "completion", "refs")


def resource_id(value: str | Model | Dataset) -> str:
    """An id, from an id string or a registered `Model` / `Dataset`."""
    return value if isinstance(value, str) else value.id


def jsonable(value: Any) -> Any:
    """numpy arrays and scalars (also nested in lists/dicts) as plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def samples_payload(samples: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `samples` object: `samples` as given, or built from the keyword fields (`x`, `y`,
    `text`, ...) that are not None; numpy arrays become nested lists. None when neither is given."""
    given = {k: v for k, v in fields.items() if v is not None}
    if samples is not None and given:
        raise ValueError("pass either samples= or the fields x=/y=/text=..., not both")
    chosen = dict(samples) if samples is not None else given
    return jsonable(chosen) if chosen else None


def model_body(name: str, uri: str, task: str, format: str, architecture: str | None) -> dict[str, Any]:
    body = {"name": name, "uri": uri, "format": format, "task": task}
    return body | ({"architecture": architecture} if architecture else {})


def dataset_body(name: str, shards: Sequence[str]) -> dict[str, Any]:
    return {"name": name, "shards": [{"uri": uri} for uri in shards]}


def query_body(model: str | Model, dataset: str | Dataset, *, method: str, samples: dict[str, Any] | None,
               top_k: int, params: Mapping[str, Any] | None, mode: str, self_influence: bool,
               extra: Mapping[str, Any]) -> dict[str, Any]:
    """The `POST /v1/queries` body; `extra` holds further top-level fields (`group_by`, ...)."""
    body: dict[str, Any] = {"model_id": resource_id(model), "dataset_id": resource_id(dataset), "method": method,
                            "top_k": top_k, "mode": mode, "self_influence": self_influence,
                            "params": jsonable(dict(params or {}))}
    if samples is not None:
        body["samples"] = samples
    return body | jsonable(dict(extra))


def new_idempotency_key() -> str:
    return f"client-{uuid.uuid4()}"


def scores_from_npy(content: bytes) -> np.ndarray:
    """The `/scores?format=npy` body as a float32 array `[N]` (or `[Q, N]`), read without pickles."""
    return np.load(io.BytesIO(content), allow_pickle=False)
