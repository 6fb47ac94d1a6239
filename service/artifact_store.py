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
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

from service.atomic_files import write_atomic
from service.settings import Settings

HITS_KEY = "attr:stats:hits"
MISSES_KEY = "attr:stats:misses"


class RedisArtifactStore:
    """`ArtifactStore` on Redis with a TTL per entry and global hit/miss counters."""

    def __init__(self, redis: Any, ttl: int) -> None:
        self.redis = redis
        self.ttl = ttl

    def get(self, key: str) -> bytes | None:
        value = self.redis.get(key)
        self.redis.incr(MISSES_KEY if value is None else HITS_KEY)
        return value

    def put(self, key: str, value: bytes) -> None:
        self.redis.set(key, value, ex=self.ttl if self.ttl > 0 else None)

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
            else:
                value = path.read_bytes()
        except FileNotFoundError:
            value = None
        self.counters.count(value is not None)
        return value

    def put(self, key: str, value: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(key), value)

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
