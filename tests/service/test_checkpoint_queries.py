"""Multi-checkpoint TracIn and TRAK through the API (embedded mode): `params.checkpoint_model_ids`
and `params.checkpoint_lrs` are validated at POST against the tenant's registered models and
resolved by the job into the methods' checkpoints θ_c."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error
from tests.workers import support


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return e.embedded_settings(tmp_path_factory.mktemp("checkpoints") / "data")


@pytest.fixture(scope="module")
def clients(settings: Settings) -> Iterator[tuple[TestClient, TestClient]]:
    with e.client(settings, "a") as a, e.client(settings, "b") as b:
        yield a, b


@pytest.fixture(scope="module")
def earlier() -> list[torch.nn.Module]:
    """Two earlier checkpoints: the same architecture trained from other seeds."""
    return [support.toy_problem(n=60, seed=1).module, support.toy_problem(n=60, seed=2).module]


@pytest.fixture(scope="module")
def ids(settings: Settings, clients: tuple[TestClient, TestClient], earlier: list[torch.nn.Module]) -> dict[str, Any]:
    a, b = clients
    final = e.save_model(settings, e.toy().module, "final.pt")
    return {
        "model": e.register_model(a, final),
        "dataset": e.register_dataset(a, e.write_shards(settings, [30, 30])),
        "checkpoints": [e.register_model(a, e.save_model(settings, m, f"ckpt-{i}.pt")) for i, m in enumerate(earlier)],
        "regression": e.register_model(a, final, task="regression"),
        "wider": e.register_model(a, e.save_model(settings, torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)), "wider.pt")),
        "foreign": e.register_model(b, final),
    }


def body(ids: dict[str, Any], method: str = "tracin", **params: Any) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": method, "samples": e.samples(2),
            "top_k": 3, "params": params}


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_checkpoint_scores_equal_the_pipeline_with_those_checkpoints(
    clients: tuple[TestClient, TestClient], ids: dict[str, Any], earlier: list[torch.nn.Module], method: str
) -> None:
    http, _ = clients
    lrs = [0.5, 0.25]
    done = e.run(http, body(ids, method, checkpoint_model_ids=ids["checkpoints"], checkpoint_lrs=lrs))
    assert done["params"]["checkpoint_model_ids"] == ids["checkpoints"] and done["params"]["checkpoint_lrs"] == lrs
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores(method, {}, rows=60, queries=e.query_batch(2), checkpoints=earlier,
                               checkpoint_lrs=lrs)[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    final_only = e.direct_scores(method, {}, rows=60, queries=e.query_batch(2))[0]
    assert not np.allclose(served, final_only, rtol=1e-2)  # the checkpoints, not θ̂, were used
    top = [r["index"] for r in done["result"]["top"]]
    assert top == np.argsort(-expected, kind="stable")[:3].tolist()


def test_checkpoints_are_part_of_the_request(clients: tuple[TestClient, TestClient], ids: dict[str, Any]) -> None:
    http, _ = clients
    first = e.run(http, body(ids, checkpoint_model_ids=ids["checkpoints"], checkpoint_lrs=[1.0, 2.0]))
    repeated = http.post("/v1/queries", json=body(ids, checkpoint_model_ids=ids["checkpoints"],
                                                  checkpoint_lrs=[1.0, 2.0])).json()
    assert repeated["cached"] is True and repeated["source_query_id"] == first["id"]
    for changed in ({"checkpoint_model_ids": ids["checkpoints"][::-1], "checkpoint_lrs": [1.0, 2.0]},
                    {"checkpoint_model_ids": ids["checkpoints"], "checkpoint_lrs": [1.0, 3.0]},
                    {"checkpoint_model_ids": ids["checkpoints"][:1]}):
        other = http.post("/v1/queries", json=body(ids, **changed)).json()
        assert other["cached"] is False, changed
        assert e.wait_done(http, other["id"])["status"] == "succeeded"


def test_checkpoint_ids_must_be_the_tenants_models_of_the_same_task_and_size(
    settings: Settings, clients: tuple[TestClient, TestClient], ids: dict[str, Any]
) -> None:
    http, other_tenant = clients
    good = ids["checkpoints"][0]
    for bad, reason in ((["0" * 32], "unknown model"), ([good, ids["foreign"]], "unknown model"),
                        ([good, "not an id"], "unknown model"), ([ids["regression"]], "task regression"),
                        ([ids["wider"]], "parameters")):
        error = assert_error(http.post("/v1/queries", json=body(ids, checkpoint_model_ids=bad)), 422,
                             "invalid_params", mentions=f"params.checkpoint_model_ids[{len(bad) - 1}]")
        assert reason in error["detail"], error
    # Tenant b cannot tell a's checkpoint ids from ids that do not exist.
    b_dataset = e.register_dataset(other_tenant, sorted(settings.data_root.glob("train-*.npz")))

    def as_b(checkpoint: str) -> dict[str, Any]:
        return assert_error(other_tenant.post("/v1/queries", json={
            "model_id": ids["foreign"], "dataset_id": b_dataset, "method": "tracin", "samples": e.samples(1),
            "params": {"checkpoint_model_ids": [checkpoint]}}), 422, "invalid_params")

    assert as_b(good)["detail"].replace(good, "ID") == as_b("f" * 32)["detail"].replace("f" * 32, "ID")


CHECKPOINTS = "<the two registered checkpoints>"


@pytest.mark.parametrize(("params", "field"), [
    ({"checkpoint_lrs": [1.0]}, "params.checkpoint_lrs"),  # learning rates without checkpoints
    ({"checkpoint_model_ids": CHECKPOINTS, "checkpoint_lrs": [1.0]}, "params.checkpoint_lrs"),
    ({"checkpoint_model_ids": CHECKPOINTS, "checkpoint_lrs": [1.0, 0.0]}, "params.checkpoint_lrs[1]"),
    ({"checkpoint_model_ids": CHECKPOINTS, "checkpoint_lrs": [-0.5, 1.0]}, "params.checkpoint_lrs[0]"),
    ({"checkpoint_model_ids": CHECKPOINTS, "checkpoint_lrs": [1.0, "fast"]}, "params.checkpoint_lrs"),
    ({"checkpoint_model_ids": "abc"}, "params.checkpoint_model_ids"),
    ({"checkpoint_model_ids": [""]}, "params.checkpoint_model_ids[0]"),
])
def test_invalid_checkpoint_params_are_422(clients: tuple[TestClient, TestClient], ids: dict[str, Any],
                                           params: dict[str, Any], field: str) -> None:
    http, _ = clients
    resolved = {k: ids["checkpoints"] if v == CHECKPOINTS else v for k, v in params.items()}
    assert_error(http.post("/v1/queries", json=body(ids, **resolved)), 422, "invalid_params", mentions=field)


@pytest.mark.parametrize("method", ["gradient_similarity", "influence"])
def test_methods_without_checkpoints_refuse_them(clients: tuple[TestClient, TestClient], ids: dict[str, Any],
                                                 method: str) -> None:
    http, _ = clients
    assert_error(http.post("/v1/queries", json=body(ids, method, checkpoint_model_ids=ids["checkpoints"])), 422,
                 "invalid_params", mentions="params.checkpoint_model_ids: unknown parameter")


def test_forward_inf_self_influence_sums_over_checkpoints_and_refuses_them_for_predictions(
    clients: tuple[TestClient, TestClient], ids: dict[str, Any], earlier: list[torch.nn.Module]
) -> None:
    http, _ = clients
    lrs = [0.5, 0.25]
    audit = {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "forward_inf", "self_influence": True,
             "top_k": 3, "params": {"checkpoint_model_ids": ids["checkpoints"], "checkpoint_lrs": lrs}}
    done = e.run(http, audit)
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("forward_inf", {}, rows=60, queries=None, checkpoints=earlier, checkpoint_lrs=lrs,
                               self_influence=True)[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=2e-6)  # differences of fp32 losses (shard batches)
    final_only = e.direct_scores("forward_inf", {}, rows=60, queries=None, self_influence=True)[0]
    assert not np.allclose(served, final_only, rtol=1e-2)
    unknown = {**audit, "params": {"checkpoint_model_ids": ["no-such-model"]}}
    assert_error(http.post("/v1/queries", json=unknown), 422, "invalid_params", "checkpoint_model_ids[0]")
    prediction = body(ids, "forward_inf", checkpoint_model_ids=ids["checkpoints"])
    assert_error(http.post("/v1/queries", json=prediction), 422, "invalid_params", "self_influence only")
