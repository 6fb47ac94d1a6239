"""The artifact cache behind `attribution.artifacts.ArtifactStore`: Redis, or files when embedded.

Methods store costly, content-keyed artifacts here (the base training losses `L(θ̂, z_i)`
that Forward-INF subtracts, curvature factors, projected gradients, self-influence
vectors), so a second query on the same model and dataset never recomputes them. Keys
already encode every input (model/dataset sha256, task, fit arguments), so entries never
need invalidation, only a TTL to bound memory.

- `RedisArtifactStore`: `GET`/`SET ... EX ttl` on the queue's Redis; every lookup
  increments `attr:stats:hits` or `attr:stats:misses` (read by `/metrics`).
- `FileArtifactStore` (embedded mode, no Redis): one file per key under
  `<service dir>/artifacts`, written atomically (temp file + `os.replace`), entries older
  than the TTL count as misses; hit/miss counters live in process memory (the embedded
  service is one process).

Beside each artifact both keep its `attribution.artifacts.fit_record` (kind, fingerprint, fit
arguments; `attr:record:<key>` with the same TTL, or a `.json` file), so `fitted_artifacts`
lists a model's artifacts with the arguments that made them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.atomic_files import write_atomic
from service.settings import Settings


def artifact_fingerprint(model_sha256: str, dataset_sha256: str, task: str, row_start: int, row_stop: int) -> str:
    """What the cached artifacts of a method run depend on besides its params: model and
    dataset contents, task and the row range scored. The single-query, fan-out and batched
    paths (and the dry-run estimate's cache lookups) all use it, so they share the cached `L(θ̂, ·)` and fits."""
    return f"{model_sha256}:{dataset_sha256}:{task}:{row_start}-{row_stop}"


HITS_KEY = "attr:stats:hits"
MISSES_KEY = "attr:stats:misses"
RECORD_PREFIX = "attr:record:"


def fitted_artifacts(store: RedisArtifactStore | FileArtifactStore, model_sha256: str) -> list[dict[str, Any]]:
    """The live artifacts of the model with content hash `model_sha256` (every dataset and row
    range): `{"key", "kind", "fingerprint", "args"}` each, ordered by kind and key."""
    found = []
    for key, record in store.records():
        entry = json.loads(record)
        if entry["fingerprint"].startswith(f"{model_sha256}:"):
            found.append({"key": key, **entry})
    return sorted(found, key=lambda e: (e["kind"], e["key"]))


class RedisArtifactStore:
    """`ArtifactStore` on Redis with a TTL per entry and global hit/miss counters."""

    def __init__(self, redis: Any, ttl: int) -> None:
        self.redis = redis
        self.ttl = ttl

    def get(self, key: str) -> bytes | None:
        value = self.redis.get(key)
        self.redis.incr(MISSES_KEY if value is None else HITS_KEY)
        return value

    def contains(self, key: str) -> bool:
        """Whether `key` is stored, without reading it or counting a hit or miss (cost estimates)."""
        return bool(self.redis.exists(key))

    def put(self, key: str, value: bytes, record: str) -> None:
        ttl = self.ttl if self.ttl > 0 else None
        with self.redis.pipeline() as pipe:
            pipe.set(key, value, ex=ttl)
            pipe.set(RECORD_PREFIX + key, record, ex=ttl)
            pipe.execute()

    def records(self) -> Iterator[tuple[str, str]]:
        """`(key, fit record JSON)` of every stored artifact (a `SCAN` of the record keys)."""
        for name in self.redis.scan_iter(match=RECORD_PREFIX + "*", count=1000):
            record = self.redis.get(name)
            if record is not None:  # not expired since the scan
                yield name.decode()[len(RECORD_PREFIX):], record.decode()

    def stats(self) -> dict[str, int]:
        hits, misses = self.redis.mget(HITS_KEY, MISSES_KEY)
        return {"hits": int(hits or 0), "misses": int(misses or 0)}


class _Counters:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()

    def count(self, hit: bool) -> None:
        with self.lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1


_FILE_COUNTERS: dict[str, _Counters] = {}
_FILE_COUNTERS_LOCK = threading.Lock()


def _counters_for(root: Path) -> _Counters:
    with _FILE_COUNTERS_LOCK:
        return _FILE_COUNTERS.setdefault(str(root), _Counters())


class FileArtifactStore:
    """`ArtifactStore` on local files: `<root>/<sha256(key)>.bin`, atomic writes, TTL on read."""

    def __init__(self, root: Path, ttl: int) -> None:
        self.root = root
        self.ttl = ttl
        self.counters = _counters_for(root)

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.bin"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        value: bytes | None = None
        try:
            if self.ttl > 0 and time.time() - path.stat().st_mtime > self.ttl:
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
            else:
                value = path.read_bytes()
        except FileNotFoundError:
            value = None
        self.counters.count(value is not None)
        return value

    def contains(self, key: str) -> bool:
        """Whether a live entry for `key` exists, without reading it or counting a hit or miss."""
        try:
            age = time.time() - self._path(key).stat().st_mtime
        except FileNotFoundError:
            return False
        return self.ttl <= 0 or age <= self.ttl

    def put(self, key: str, value: bytes, record: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(key).with_suffix(".json"), json.dumps({"key": key, "record": record}).encode())
        write_atomic(self._path(key), value)

    def records(self) -> Iterator[tuple[str, str]]:
        """`(key, fit record JSON)` of every live artifact (its `.json` sidecar beside a live `.bin`)."""
        for sidecar in sorted(self.root.glob("*.json")):
            try:
                entry = json.loads(sidecar.read_text())
            except FileNotFoundError:
                continue
            if self.contains(entry["key"]):
                yield entry["key"], entry["record"]

    def stats(self) -> dict[str, int]:
        with self.counters.lock:
            return {"hits": self.counters.hits, "misses": self.counters.misses}


def artifact_store(settings: Settings) -> RedisArtifactStore | FileArtifactStore:
    """The deployment's store: Redis when `REDIS_URL` is set, files under the service dir otherwise."""
    if settings.redis_url:
        from service.queue import redis_connection

        return RedisArtifactStore(redis_connection(settings.redis_url), settings.artifact_ttl_s)
    return FileArtifactStore(settings.service_dir / "artifacts", settings.artifact_ttl_s)


def cache_stats(settings: Settings) -> dict[str, int]:
    """`{"hits": int, "misses": int}` of artifact lookups (all workers on Redis; this process embedded)."""
    return artifact_store(settings).stats()
