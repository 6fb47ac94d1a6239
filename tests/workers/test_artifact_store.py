"""Artifact stores: Redis (with hit/miss counters) and the embedded file store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from redis import Redis

from attribution.artifacts import FitArgs, artifact_key, cached_tensors, fit_record
from service.artifact_store import (
    FileArtifactStore,
    RedisArtifactStore,
    artifact_store,
    cache_stats,
    fitted_artifacts,
)
from service.atomic_files import atomic_file
from service.settings import Settings
from workers.leases import FileLeases, RedisLeases, holding
from workers.results import save_npy


class Losses(FitArgs):
    kind = "losses"
    batch_size: int


FINGERPRINT = "model-sha:data-sha:classification:0-5"


def test_redis_store_round_trip_ttl_and_counters(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    store = RedisArtifactStore(redis, ttl=60)
    args = Losses(batch_size=4)
    key = artifact_key(FINGERPRINT, args)
    assert store.get(key) is None
    store.put(key, b"\x00payload", fit_record(FINGERPRINT, args))
    assert store.get(key) == b"\x00payload"
    assert 0 < redis.ttl(key) <= 60 and 0 < redis.ttl(f"attr:record:{key}") <= 60
    assert store.stats() == {"hits": 1, "misses": 1}
    settings = Settings(redis_url=redis_url)
    assert isinstance(artifact_store(settings), RedisArtifactStore)
    assert cache_stats(settings) == {"hits": 1, "misses": 1}


def test_cached_tensors_computes_once_across_store_instances(redis_url: str) -> None:
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"losses": torch.arange(5, dtype=torch.float32)}

    for _ in range(3):
        store = RedisArtifactStore(Redis.from_url(redis_url), ttl=60)  # a fresh "worker" each time
        values = cached_tensors(store, FINGERPRINT, Losses(batch_size=4), compute)
        torch.testing.assert_close(values["losses"], torch.arange(5, dtype=torch.float32))
    assert len(calls) == 1
    assert cache_stats(Settings(redis_url=redis_url)) == {"hits": 2, "misses": 1}


def test_file_store_is_atomic_counts_and_expires(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path / "data")
    store = artifact_store(settings)
    assert isinstance(store, FileArtifactStore)
    before = cache_stats(settings)
    assert store.get("attr:x:1") is None
    store.put("attr:x:1", b"abc", "{}")
    store.put("attr:x:1", b"abcd", "{}")
    assert store.get("attr:x:1") == b"abcd"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []  # no temp files left
    after = cache_stats(settings)
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)
    expiring = FileArtifactStore(store.root, ttl=10)
    path = expiring._path("attr:x:1")
    old = time.time() - 60
    os.utime(path, (old, old))
    assert expiring.get("attr:x:1") is None and not path.exists() and not path.with_suffix(".json").exists()


def test_artifacts_are_listed_per_model_with_their_fit_args(redis_url: str, tmp_path: Path) -> None:
    for store in (RedisArtifactStore(Redis.from_url(redis_url), ttl=60), FileArtifactStore(tmp_path / "a", ttl=60)):
        for fingerprint, batch_size in [(FINGERPRINT, 4), (FINGERPRINT, 8), ("other-sha:data-sha:classification:0-5", 4)]:
            cached_tensors(store, fingerprint, Losses(batch_size=batch_size), lambda: {"losses": torch.zeros(2)})
        listed = fitted_artifacts(store, "model-sha")
        assert [(e["kind"], e["fingerprint"], e["args"]) for e in sorted(listed, key=lambda e: e["args"]["batch_size"])] \
            == [("losses", FINGERPRINT, {"batch_size": 4}), ("losses", FINGERPRINT, {"batch_size": 8})]
        assert {e["key"] for e in listed} == {artifact_key(FINGERPRINT, Losses(batch_size=b)) for b in (4, 8)}
        assert fitted_artifacts(store, "model") == []  # a model sha is matched whole


def test_leases_are_exclusive_and_expire(redis_url: str, tmp_path: Path) -> None:
    for store in (RedisLeases(Redis.from_url(redis_url), ttl=2), FileLeases(tmp_path / "leases", ttl=2)):
        with holding(store, "query:abc") as held:
            assert held is not None and store.alive("query:abc")
            assert not store.acquire("query:abc", "someone-else")
            with holding(store, "query:abc") as second:
                assert second is None
        assert not store.alive("query:abc")
        assert store.acquire("query:abc", "crashed-worker")  # never released: must expire by itself
        assert not store.acquire("query:abc", "other")
        time.sleep(2.1)
        assert not store.alive("query:abc") and store.acquire("query:abc", "other")


def test_atomic_file_replaces_whole_or_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "scores.npy"
    matrix = np.random.default_rng(0).normal(size=(3, 1001)).astype(np.float32)
    matrix[1, ::7] = np.nan
    save_npy(path, matrix)  # streamed straight to the file
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), matrix)
    save_npy(path, matrix[0])
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), matrix[0])
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as out:
        out.write(b"partial")
        raise RuntimeError("disk full")
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), matrix[0])  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npy"]  # temp file removed
