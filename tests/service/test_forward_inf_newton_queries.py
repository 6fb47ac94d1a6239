"""Forward-INF with Newton-step unlearning through the API (embedded mode): the params pass
validation, reach the job through the registry, enter the request hash, and give the scores
the core library gives on the same model and rows (the service's TorchScript model against
the eager module, with the exact and the CG inverse)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error

NEWTON: dict[str, Any] = {"unlearning": "newton", "damping": 0.01}


settings, http = e.module_service("newton")


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    return e.register_toy(settings, http)


def body(ids: dict[str, str], mode: str = "per_sample", **params: Any) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "forward_inf", "mode": mode,
            "samples": e.samples(2), "top_k": 3, "params": params}


@pytest.mark.parametrize("params", [NEWTON, {**NEWTON, "ihvp": "cg"}])
def test_newton_query_equals_the_core_library_and_is_cached_by_its_params(
    http: TestClient, ids: dict[str, str], params: dict[str, Any]
) -> None:
    done = e.run(http, body(ids, **params))
    assert done["params"]["unlearning"] == "newton" and done["params"]["damping"] == 0.01
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("forward_inf", params, rows=60, queries=e.query_batch(2), per_sample=True)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    gradient = e.direct_scores("forward_inf", {}, rows=60, queries=e.query_batch(2), per_sample=True)
    assert not np.allclose(served, gradient, rtol=1e-2)  # the Newton step, not Algorithm 1, was run
    repeat = http.post("/v1/queries", json=body(ids, **params)).json()
    assert repeat["cached"] is True and repeat["source_query_id"] == done["id"]
    other = http.post("/v1/queries", json=body(ids, **{**params, "damping": 0.1})).json()
    assert other["cached"] is False  # damping is part of the request hash
    assert e.wait_done(http, other["id"])["status"] == "succeeded"


def test_invalid_newton_combinations_are_rejected_at_post(http: TestClient, ids: dict[str, str]) -> None:
    for params, field in (({"unlearning": "newton", "optimizer": "adam"}, "optimizer"),
                          ({"unlearning": "newton", "steps": 5}, "steps"),
                          ({"ihvp": "cg"}, "ihvp"), ({"unlearning": "hessian"}, "unlearning")):
        assert_error(http.post("/v1/queries", json=body(ids, **params)), 422, "invalid_params", field)


def test_newton_queries_are_neither_fanned_out_nor_batched(settings: Settings) -> None:
    """The Newton step fits (G + λI)⁻¹ and takes α = Q/N over the whole training set, so its
    scores are not row-separable (no fan-out), and its unlearned copy is not Algorithm 1's
    (no shared-sweep batch)."""
    from service.db.models import Query
    from workers.batching import sweep_key
    from workers.fanout_plan import should_fan_out

    def query(**params: Any) -> Query:
        return Query(method="forward_inf", params=params, mode="joint", self_influence=False,
                     model_id="m", dataset_id="d")

    rows = settings.fanout_rows * 4
    raw = {"steps": 5, "lr": 0.01, "normalize": "none"}  # relative scores (the default) never fan out
    assert should_fan_out(query(**raw), rows, settings) and sweep_key(query(**raw))
    assert not should_fan_out(query(unlearning="newton"), rows, settings)
    assert sweep_key(query(unlearning="newton")) is None
