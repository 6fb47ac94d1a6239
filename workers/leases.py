"""Leases: proof that a live worker is running a query (or one fan-out part of it).

A job takes the lease `query:<id>` (or `part:<id>:<n>`) before it marks the row `running`
and renews it from a background thread every `ttl / 3` seconds; it releases it when done.
So a `running` row without a live lease belongs to a dead worker (SIGKILL, OOM, lost
machine), which is what the reaper (`workers.reaper`) looks for, and a duplicate
delivery of the same job (RQ retry, re-enqueue) finds the lease taken and does nothing.

Redis leases are `SET key owner NX EX ttl`, renewed/released only by their owner (Lua
compare-and-set). Embedded mode (no Redis) keeps them as files under
`<service dir>/leases`, the file's mtime being the last renewal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from service.atomic_files import write_atomic
from service.settings import Settings

log = logging.getLogger(__name__)

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Leases(Protocol):
    ttl: int

    def acquire(self, name: str, owner: str) -> bool: ...

    def renew(self, name: str, owner: str) -> bool: ...

    def release(self, name: str, owner: str) -> None: ...

    def alive(self, name: str) -> bool: ...


class RedisLeases:
    def __init__(self, redis: Any, ttl: int) -> None:
        self.redis = redis
        self.ttl = ttl

    @staticmethod
    def _key(name: str) -> str:
        return f"attr:lease:{name}"

    def acquire(self, name: str, owner: str) -> bool:
        return bool(self.redis.set(self._key(name), owner, nx=True, ex=self.ttl))

    def renew(self, name: str, owner: str) -> bool:
        return bool(self.redis.eval(_RENEW, 1, self._key(name), owner, self.ttl))

    def release(self, name: str, owner: str) -> None:
        self.redis.eval(_RELEASE, 1, self._key(name), owner)

    def alive(self, name: str) -> bool:
        return bool(self.redis.exists(self._key(name)))


class FileLeases:
    _lock = threading.Lock()

    def __init__(self, root: Path, ttl: int) -> None:
        self.root = root
        self.ttl = ttl

    def _path(self, name: str) -> Path:
        return self.root / name.replace(":", "_")

    def _holder(self, name: str) -> str | None:
        """The owner of a live lease, or None if absent or expired."""
        path = self._path(name)
        try:
            if time.time() - path.stat().st_mtime > self.ttl:
                return None
            return path.read_text()
        except FileNotFoundError:
            return None

    def acquire(self, name: str, owner: str) -> bool:
        with self._lock:
            if self._holder(name) not in (None, owner):
                return False
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(name), owner.encode())
            return True

    def renew(self, name: str, owner: str) -> bool:
        with self._lock:
            if self._holder(name) != owner:
                return False
            os.utime(self._path(name))
            return True

    def release(self, name: str, owner: str) -> None:
        with self._lock:
            if self._holder(name) == owner:
                self._path(name).unlink(missing_ok=True)

    def alive(self, name: str) -> bool:
        return self._holder(name) is not None


def leases(settings: Settings) -> RedisLeases | FileLeases:
    ttl = max(int(settings.worker_lease_ttl_s), 2)
    if settings.redis_url:
        from service.queue import redis_connection

        return RedisLeases(redis_connection(settings.redis_url), ttl)
    return FileLeases(settings.service_dir / "leases", ttl)


def new_owner() -> str:
    """A unique holder name: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class HeldLease:
    """A lease kept alive by a daemon thread; `lost` turns True if another holder took it over."""

    def __init__(self, store: Leases, name: str, owner: str) -> None:
        self.store, self.name, self.owner = store, name, owner
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{name}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = max(self.store.ttl / 3, 0.5)
        while not self._stop.wait(interval):
            try:
                if not self.store.renew(self.name, self.owner):
                    self.lost = True
                    log.warning("lease %s was lost; the job will stop", self.name)
                    return
            except Exception:  # a Redis blip: keep trying until the lease expires
                log.warning("could not renew lease %s", self.name, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.release(self.name, self.owner)
        except Exception:
            log.warning("could not release lease %s (it expires on its own)", self.name, exc_info=True)


@contextlib.contextmanager
def holding(store: Leases, name: str) -> Iterator[HeldLease | None]:
    """Hold lease `name` for the block; yields `None` (and holds nothing) if someone else has it."""
    owner = new_owner()
    if not store.acquire(name, owner):
        yield None
        return
    held = HeldLease(store, name, owner)
    try:
        yield held
    finally:
        held.release()
