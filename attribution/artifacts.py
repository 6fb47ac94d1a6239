"""Costly, reusable artifacts (cached training losses, curvature factors, projected
gradients, self-influence vectors), keyed by content hashes.

The core library only needs `get`/`put` of tensors by key; the workers plug in a Redis
store, tests use `InMemoryArtifacts`. A key is derived from everything the value depends
on — the model's and dataset's content hashes, the task, and the fitting arguments — so
a changed file or argument can never serve a stale artifact.

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
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class ArtifactStore(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


class InMemoryArtifacts:
    """A dict-backed `ArtifactStore` that also counts hits and misses."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> bytes | None:
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value


def artifact_key(kind: str, *parts: Any) -> str:
    """`attr:<kind>:<sha256 of the canonical JSON of parts>`; dataclasses become dicts."""
    return f"attr:{kind}:{hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()}"


def canonical_json(value: Any) -> str:
    """Key-sorted JSON of `value` with dataclasses as dicts and tuples as lists (hashing input)."""
    return json.dumps(_plain(value), sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


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
    store: ArtifactStore | None, key: str, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Return the artifact at `key`, computing and storing it on a miss (decoded through `DECODED`)."""
    if store is not None:
        raw = store.get(key)
        if raw is not None:
            return DECODED.decode(key, raw)
    value = compute()
    if store is not None:
        store.put(key, tensors_to_bytes(value))
    return value
