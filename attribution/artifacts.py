"""Costly, reusable artifacts (cached training losses, curvature factors, projected
gradients, self-influence vectors), keyed by content hashes.

The core library only needs `get`/`put` of tensors by key; the workers plug in a Redis
store, tests use `InMemoryArtifacts`. A key is derived from everything the value depends
on — the fingerprint (the model's and dataset's content hashes, the task) and the method's
`FitArgs` — so a changed file or argument can never serve a stale artifact; the arguments
are stored beside the value (`fit_record`).

Decoding (`torch.load`) costs more than the forward pass of a small model, so `cached_tensors`
keeps the last decoded value of each small artifact (`DecodedMemo`): the store is still asked
every time and its bytes decide, only an unchanged value is not decoded again.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor


class FitArgs(BaseModel):
    """What one kind of fitted artifact depends on besides the model and data (the fingerprint).

    Each method that fits artifacts declares one small frozen model per kind, built from its
    params (kronfluence's split of fit and score arguments): the key is the sha256 of the
    canonical JSON of (kind, fingerprint, these arguments) whole, and that JSON (`fit_record`)
    is stored beside the artifact, so the artifacts of a model can be listed with the
    arguments that made them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str]


def fit_record(fingerprint: str, args: FitArgs) -> str:
    """The canonical JSON `{"args", "fingerprint", "kind"}` hashed into the artifact key and stored beside it."""
    return canonical_json({"kind": args.kind, "fingerprint": fingerprint, "args": args.model_dump(mode="json")})


def artifact_key(fingerprint: str, args: FitArgs) -> str:
    """`attr:<kind>:<sha256 of fit_record(fingerprint, args)>`."""
    return f"attr:{args.kind}:{hashlib.sha256(fit_record(fingerprint, args).encode()).hexdigest()}"


def canonical_json(value: Any) -> str:
    """Key-sorted JSON of `value`, tuples as lists, other values as `str` (hashing input)."""
    return json.dumps(value, sort_keys=True, default=str)


class ArtifactStore(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, record: str) -> None:
        """Store `value` at `key` and its `fit_record` JSON beside it."""


class InMemoryArtifacts:
    """A dict-backed `ArtifactStore` that also counts hits and misses."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.records: dict[str, str] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes, record: str) -> None:
        self.data[key] = value
        self.records[key] = record


def tensors_to_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    """Serialise a dict of tensors (`torch.save`, loaded back with `weights_only=True`)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def tensors_from_bytes(value: bytes) -> dict[str, Tensor]:
    loaded = torch.load(io.BytesIO(value), weights_only=True, map_location="cpu")
    if not isinstance(loaded, dict):
        raise ValueError("artifact is not a tensor dictionary")
    return loaded


class DecodedMemo:
    """Per process: key → (stored bytes, decoded tensors) of artifacts up to `max_entry_bytes`
    stored bytes, least recently used out first beyond `max_bytes` in all (the decoded tensors
    take about as much again). A lookup hits only when the store's bytes equal the memorised
    ones, and returns copies (callers may write to their tensors)."""

    def __init__(self, *, max_bytes: int = 32 << 20, max_entry_bytes: int = 4 << 20) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.entries: OrderedDict[str, tuple[bytes, dict[str, Tensor]]] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()  # worker threads share the process's memo

    def decode(self, key: str, raw: bytes) -> dict[str, Tensor]:
        """`tensors_from_bytes(raw)`, from the memo when `raw` is the value last decoded at `key`."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0] == raw:
                self.entries.move_to_end(key)
                return {k: v.clone() for k, v in entry[1].items()}
        value = tensors_from_bytes(raw)
        if len(raw) <= self.max_entry_bytes:
            with self.lock:
                old = self.entries.pop(key, None)
                self.size -= len(old[0]) if old is not None else 0
                self.entries[key] = (raw, {k: v.clone() for k, v in value.items()})
                self.size += len(raw)
                while self.size > self.max_bytes:
                    self.size -= len(self.entries.popitem(last=False)[1][0])
        return value


DECODED = DecodedMemo()


def cached_tensors(
    store: ArtifactStore | None, fingerprint: str, args: FitArgs, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The artifact `args` describes for `fingerprint`, computed and stored (with its
    `fit_record`) on a miss; decoded through `DECODED`."""
    key = artifact_key(fingerprint, args)
    if store is not None:
        raw = store.get(key)
        if raw is not None:
            return DECODED.decode(key, raw)
    value = compute()
    if store is not None:
        store.put(key, tensors_to_bytes(value), fit_record(fingerprint, args))
    return value
