"""The product end to end, as a new user (or the acceptance script) drives it: train a small
MLP on digits, save it with `torch.jit.save`, write the training set as two `.npz` shards with
20 test points planted in them, start `python -m service` (embedded default; and Postgres +
Redis + a separate `python -m workers`), register both over HTTP, and query.

Checks: every Forward-INF score vector equals an independent Algorithm 1 (Pearson ≥ 0.999,
same top-1); `influence`/`cg` agrees with an exact damped Gauss-Newton influence computed
independently; a repeat is answered `cached`; malformed requests get 4xx JSON.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from service.testing import ServiceProcesses, wait_final
from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL
from tests.e2e import reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_PLANTED = 20
QUERIES = 3  # single-sample queries checked against the references per deployment


class Case:
    def __init__(self, root: Path) -> None:
        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        rng = np.random.default_rng(7)
        order = rng.permutation(len(y))
        train, test = order[:1200], order[1200:]
        planted = test[:NUM_PLANTED]
        rows = np.concatenate([train, planted])
        rng.shuffle(rows)
        self.x, self.y = x[rows], y[rows]
        self.query_x, self.query_y = x[planted], y[planted]
        self.copy_index = [int(np.where(rows == t)[0][0]) for t in planted]
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
        opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(self.x), torch.from_numpy(self.y)
        for _ in range(200):
            opt.zero_grad()
            F.cross_entropy(self.model(xt), yt).backward()
            opt.step()
        self.model.eval()
        self.root = root
        self.model_path = root / "models" / "mlp.pt"
        self.model_path.parent.mkdir(parents=True)
        torch.jit.save(torch.jit.script(self.model), self.model_path)
        half = len(rows) // 2
        shards = root / "shards"
        shards.mkdir()
        np.savez(shards / "train-000.npz", x=self.x[:half], y=self.y[:half])
        np.savez(shards / "train-001.npz", x=self.x[half:], y=self.y[half:])
        self.shard_uris = [(shards / f"train-00{i}.npz").as_uri() for i in range(2)]
        (root / "unloadable.pt").write_bytes(b"")

    def query(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.query_x[i: i + 1]), torch.from_numpy(self.query_y[i: i + 1])


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp("e2e") / "data")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def _scores(client: httpx.Client, query_id: str) -> np.ndarray:
    body = client.get(f"/v1/queries/{query_id}/scores", params={"format": "json"}).json()
    return np.asarray(body["scores"], dtype=np.float64).reshape(-1)


def _post_query(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/queries", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/queries/{response.json()['id']}"
    return response.json()


def _wait_final(client: httpx.Client, query_id: str) -> dict[str, Any]:
    return wait_final(client, [query_id])[query_id]


def _run_flow(url: str, case: Case) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.post("/v1/models", json={"name": "mlp", "uri": case.model_path.as_uri(),
                                                "format": "torchscript", "task": "classification"})
        assert model.status_code == 201, model.text
        dataset = client.post("/v1/datasets", json={"name": "digits", "shards": [{"uri": u} for u in case.shard_uris]})
        assert dataset.status_code == 201, dataset.text
        model_id, dataset_id = model.json()["id"], dataset.json()["id"]
        assert dataset.json()["num_samples"] == len(case.y)

        x_all, y_all = torch.from_numpy(case.x), torch.from_numpy(case.y)
        ranks = []
        for i in range(QUERIES):
            xq, yq = case.query(i)
            body = {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                    "samples": {"x": xq.tolist(), "y": yq.tolist()}, "top_k": 10,
                    "params": {"steps": 5, "lr": 0.01, "normalize": "none"}}  # Algorithm 1's raw score
            done = _wait_final(client, _post_query(client, body)["id"])
            assert done["status"] == "succeeded", done
            ours = _scores(client, done["id"])
            expected = reference.forward_inf_algorithm1(str(case.model_path), xq, yq, x_all, y_all, 5, 0.01).numpy()
            assert ours.shape == expected.shape
            assert _pearson(ours, expected) >= 0.999
            assert int(ours.argmax()) == int(expected.argmax())
            assert done["result"]["top"][0]["index"] == int(expected.argmax())
            order = np.argsort(-ours, kind="stable")
            ranks.append(int(np.where(order == case.copy_index[i])[0][0]) + 1)

            repeat = _post_query(client, body)
            assert repeat["status"] == "succeeded" and repeat["cached"] is True
            assert repeat["result"]["top"] == done["result"]["top"]
        print(f"planted-copy ranks under Algorithm 1 (steps 5, lr 0.01): {ranks}")

        xq, yq = case.query(0)
        body = {"model_id": model_id, "dataset_id": dataset_id, "method": "influence",
                "samples": {"x": xq.tolist(), "y": yq.tolist()}, "top_k": 10,
                "params": {"ihvp": "cg", "damping": 0.01, "normalize": "none"}}  # the formula's raw score
        done = _wait_final(client, _post_query(client, body)["id"])
        assert done["status"] == "succeeded", done
        ours = _scores(client, done["id"])
        exact = reference.gauss_newton_influence(case.model, xq, yq, x_all, y_all, 0.01).numpy()
        assert _pearson(ours, exact) >= 0.99
        assert int(ours.argmax()) == int(exact.argmax())
        top = done["result"]["top"]
        assert [row["rank"] for row in top] == list(range(1, 11))
        assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(top))

        _check_bad_input(client, case, model_id, dataset_id)


def _check_bad_input(client: httpx.Client, case: Case, model_id: str, dataset_id: str) -> None:
    outside = Path("/etc/hostname").as_uri()
    bad_requests = [
        ("POST", "/v1/queries", b"{not json"),
        ("POST", "/v1/queries", {"model_id": model_id, "dataset_id": dataset_id, "method": "nope",
                                 "samples": {"x": [[0.0] * 64], "y": [1]}}),
        ("POST", "/v1/queries", {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                                 "samples": {"x": [[0.0] * 63], "y": [1]}}),
        ("POST", "/v1/queries", {"model_id": "0" * 32, "dataset_id": dataset_id, "method": "forward_inf",
                                 "samples": {"x": [[0.0] * 64], "y": [1]}}),
        ("POST", "/v1/queries", {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                                 "samples": {"x": [[0.0] * 64], "y": [1]}, "params": {"steps": -1}}),
        ("POST", "/v1/models", {"name": "x", "uri": outside, "format": "torchscript", "task": "classification"}),
        ("POST", "/v1/models", {"name": "x", "uri": (case.root / "unloadable.pt").as_uri(), "format": "torchscript",
                                "task": "classification"}),
        ("POST", "/v1/datasets", {"name": "x", "shards": [{"uri": (case.root / "missing.npz").as_uri()}]}),
        ("GET", "/v1/queries/does-not-exist", None),
    ]
    for method, path, payload in bad_requests:
        if isinstance(payload, bytes):
            response = client.request(method, path, content=payload, headers={"content-type": "application/json"})
        else:
            response = client.request(method, path, json=payload)
        assert 400 <= response.status_code < 500, (path, payload, response.status_code, response.text)
        body = response.json()
        assert set(body) >= {"error", "detail"}, body
    # NaN is not JSON, but Python clients can send it: it must be refused, not scored.
    row = "[NaN" + ", 0.0" * 63 + "]"
    raw = (f'{{"model_id": "{model_id}", "dataset_id": "{dataset_id}", "method": "forward_inf", '
           f'"samples": {{"x": [{row}], "y": [1]}}}}')
    response = client.post("/v1/queries", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_embedded_default(case: Case) -> None:
    """SQLite + in-process worker: no servers, only DATA_ROOT set."""
    with ServiceProcesses({"DATA_ROOT": str(case.root)}) as running:
        _run_flow(running.url, case)


@pytest.fixture()
def clean_postgres(postgres_url: str, redis_url: str) -> Iterator[tuple[str, str]]:
    yield TEST_DATABASE_URL, TEST_REDIS_URL


def test_postgres_redis_and_separate_worker(case: Case, clean_postgres: tuple[str, str], tmp_path: Path) -> None:
    """Postgres + Redis + `python -m workers` in its own process."""
    database_url, redis_url = clean_postgres
    env = {"DATA_ROOT": str(case.root), "DATABASE_URL": database_url, "REDIS_URL": redis_url}
    with ServiceProcesses(env, workers=1, log_dir=tmp_path) as running:
        _run_flow(running.url, case)
