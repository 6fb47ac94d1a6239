"""Building blocks of the end-to-end API tests in embedded mode: a migrated SQLite database
under a fresh data root, jobs run by the API process's in-process worker, a trained toy
classifier (`tests.workers.support.toy_problem`) saved as TorchScript, and polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from service.db.migrate import upgrade_head
from service.settings import Settings
from tests.workers import support

KEYS = {"a": "key-a", "b": "key-b"}


def embedded_settings(root: Path) -> Settings:
    """Embedded settings (no DATABASE_URL, no REDIS_URL) on `root`, migrated; tenants `a` and `b`."""
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_root=root, database_url=None, redis_url=None, device="cpu",
                        api_keys=",".join(f"{key}:{tenant}" for tenant, key in KEYS.items()))
    upgrade_head(settings)
    return settings


def toy() -> support.Toy:
    return support.toy_problem(n=60)


def save_model(settings: Settings, module: torch.nn.Module, name: str) -> Path:
    return support.save_torchscript(module, settings.data_root / name)


def write_shards(settings: Settings, sizes: list[int], groups: list[Any] | None = None, *,
                 prefix: str = "train", without_group: tuple[int, ...] = ()) -> list[Path]:
    """The toy's first `sum(sizes)` rows as `.npz` shards (ids `r<index>`), with a per-row
    `group` column from `groups` except in the shards listed in `without_group`."""
    data = toy()
    paths, start = [], 0
    for position, size in enumerate(sizes):
        stop = start + size
        arrays: dict[str, Any] = {"x": data.x[start:stop], "y": data.y[start:stop],
                                  "ids": np.array([f"r{i}" for i in range(start, stop)])}
        if groups is not None and position not in without_group:
            arrays["group"] = np.asarray(groups[start:stop])
        path = settings.data_root / f"{prefix}-{position:03d}.npz"
        np.savez(path, **arrays)
        paths.append(path)
        start = stop
    return paths


def module_service(name: str) -> tuple[Callable[..., Settings], Callable[..., Iterator[TestClient]]]:
    """Module-scoped fixtures `settings` (a fresh embedded data root named `name`) and `http`
    (a client of tenant a on it); a test module binds them with `settings, http = module_service(...)`."""

    @pytest.fixture(scope="module")
    def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
        return embedded_settings(tmp_path_factory.mktemp(name) / "data")

    @pytest.fixture(scope="module")
    def http(settings: Settings) -> Iterator[TestClient]:
        with client(settings) as session:
            yield session

    return settings, http


def register_toy(settings: Settings, http: TestClient) -> dict[str, str]:
    """`{"model": id, "dataset": id}`: the toy classifier and two 30-row shards, registered."""
    return {"model": register_model(http, save_model(settings, toy().module, "toy.pt")),
            "dataset": register_dataset(http, write_shards(settings, [30, 30]))}


def client(settings: Settings, tenant: str = "a") -> TestClient:
    """An HTTP client of the app built on `settings`, speaking as `tenant`; use it in `with`."""
    from service.api.app import create_app

    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                      raise_server_exceptions=False)


def register_model(http: TestClient, path: Path, task: str = "classification") -> str:
    response = http.post("/v1/models", json={"name": path.stem, "uri": path.as_uri(), "format": "torchscript",
                                             "task": task})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def register_dataset(http: TestClient, paths: list[Path], name: str = "train") -> str:
    response = http.post("/v1/datasets", json={"name": name, "shards": [{"uri": p.as_uri()} for p in paths]})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def samples(count: int = 2) -> dict[str, Any]:
    data = toy()
    return {"x": data.x_test[:count].tolist(), "y": data.y_test[:count].tolist()}


def query_batch(count: int = 2) -> Batch:
    data = toy()
    return Batch(torch.from_numpy(data.x_test[:count]), torch.from_numpy(data.y_test[:count]))


def wait_done(http: TestClient, query_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll `GET /v1/queries/{id}` until the query is final; its body."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = http.get(f"/v1/queries/{query_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"query {query_id} still {body['status']}")
        time.sleep(0.05)


def run(http: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a query and wait for it to succeed; its final body."""
    response = http.post("/v1/queries", json=body)
    assert response.status_code == 202, response.text
    done = wait_done(http, response.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    return done


def scores(http: TestClient, query_id: str) -> dict[str, Any]:
    response = http.get(f"/v1/queries/{query_id}/scores")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def direct_scores(method: str, params: dict[str, Any], *, rows: int, queries: Batch | None,
                  checkpoints: Sequence[torch.nn.Module] = (), checkpoint_lrs: Sequence[float] = (),
                  per_sample: bool = False, self_influence: bool = False) -> np.ndarray:
    """The same attribution computed by `attribution.pipeline.attribute`, without the service: `[Q, N]`."""
    data, task = toy(), ClassificationTask()
    train = TensorTrainingSet(torch.from_numpy(data.x[:rows]), torch.from_numpy(data.y[:rows]))
    context = FitContext(fingerprint="direct", store=InMemoryArtifacts(),
                         checkpoints=[ModelAdapter(m, task) for m in checkpoints], checkpoint_lrs=list(checkpoint_lrs))
    return attribute(ModelAdapter(data.module, task), method, params, train, context, queries=queries,
                     per_sample=per_sample, self_influence=self_influence).numpy()
