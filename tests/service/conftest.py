"""Fixtures for the REST API tests: a data root with a tiny TorchScript model and .npz
shards, settings on the real Postgres (and Redis for queue behaviour) with two fresh
tenants per test, and HTTP clients speaking as each tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import Settings

NUM_FEATURES = 4
NUM_CLASSES = 3
SHARD_SIZES = (6, 4)


@dataclass(frozen=True)
class DataFiles:
    root: Path
    model: Path
    broken_model: Path
    shards: tuple[Path, ...]
    hidden_shard: Path  # inside <root>/.service: never addressable
    outside_shard: Path  # outside the data root


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> DataFiles:
    root = tmp_path_factory.mktemp("data-root")
    (root / "models").mkdir()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, NUM_CLASSES))
    model_path = root / "models" / "mlp.pt"
    torch.jit.save(torch.jit.script(module), str(model_path))
    broken = root / "models" / "broken.pt"
    broken.write_bytes(b"this is not a torch archive")

    rng = np.random.default_rng(0)
    shards = []
    for position, size in enumerate(SHARD_SIZES):
        path = root / f"train-{position:03d}.npz"
        np.savez(path, x=rng.normal(size=(size, NUM_FEATURES)).astype(np.float32),
                 y=rng.integers(0, NUM_CLASSES, size=size), ids=np.array([f"s{position}-{i}" for i in range(size)]))
        shards.append(path)
    (root / ".service").mkdir()
    hidden = root / ".service" / "hidden.npz"
    np.savez(hidden, x=np.zeros((2, NUM_FEATURES), np.float32), y=np.zeros(2, np.int64))
    outside = tmp_path_factory.mktemp("elsewhere") / "outside.npz"
    np.savez(outside, x=np.zeros((2, NUM_FEATURES), np.float32), y=np.zeros(2, np.int64))
    return DataFiles(root, model_path, broken, tuple(shards), hidden, outside)


@dataclass(frozen=True)
class Tenants:
    key_a: str
    tenant_a: str
    key_b: str
    tenant_b: str

    @property
    def api_keys(self) -> str:
        return f"{self.key_a}:{self.tenant_a},{self.key_b}:{self.tenant_b}"


@pytest.fixture()
def tenants() -> Tenants:
    tag = uuid.uuid4().hex[:12]
    return Tenants(f"key-a-{tag}", f"tenant-a-{tag}", f"key-b-{tag}", f"tenant-b-{tag}")


@pytest.fixture()
def settings(postgres_url: str, redis_url: str, data_files: DataFiles, tenants: Tenants) -> Settings:
    """Postgres + RQ on Redis db 15 (no worker runs: enqueued jobs stay queued)."""
    return Settings(database_url=postgres_url, redis_url=redis_url, data_root=data_files.root,
                    api_keys=tenants.api_keys, max_request_bytes=256 * 1024, max_top_k=1000)


def make_client(settings: Settings, key: str | None) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(create_app(settings), headers=headers, raise_server_exceptions=False)


@pytest.fixture()
def client(settings: Settings, tenants: Tenants) -> Iterator[TestClient]:
    """Speaks as tenant A."""
    with make_client(settings, tenants.key_a) as http:
        yield http


@pytest.fixture()
def other_client(settings: Settings, tenants: Tenants) -> Iterator[TestClient]:
    """Speaks as tenant B."""
    with make_client(settings, tenants.key_b) as http:
        yield http


def register_model(http: TestClient, files: DataFiles, name: str = "mlp") -> dict[str, Any]:
    response = http.post("/v1/models", json={"name": name, "uri": files.model.as_uri(),
                                             "format": "torchscript", "task": "classification"})
    assert response.status_code == 201, response.text
    return response.json()


def register_dataset(http: TestClient, files: DataFiles, name: str = "train") -> dict[str, Any]:
    response = http.post("/v1/datasets", json={"name": name, "shards": [{"uri": p.as_uri()} for p in files.shards]})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture()
def registered(client: TestClient, data_files: DataFiles) -> tuple[str, str]:
    """(model_id, dataset_id) registered by tenant A."""
    return register_model(client, data_files)["id"], register_dataset(client, data_files)["id"]


def query_body(model_id: str, dataset_id: str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
        "samples": {"x": [[0.1, -0.2, 0.3, 0.05]], "y": [1]}, "top_k": 3, "params": {"steps": 2, "lr": 0.01},
    }
    body.update(changes)
    return body


def assert_error(response: Any, status: int, code: str | None = None, mentions: str | None = None) -> dict[str, Any]:
    """The response is a JSON error of the contract's form with this status (and code / field)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"}, body
    assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["error"] == code, body
    if mentions is not None:
        assert mentions in body["detail"], body
    return body
