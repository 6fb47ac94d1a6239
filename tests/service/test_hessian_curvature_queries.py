"""`params.curvature = "hessian"` through the API (embedded mode): accepted and scored as the
core library scores it, refused at POST with a factor-based estimator, and a damped Hessian
that is not positive definite fails the query with a one-line message (no 500)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error

HESSIAN: dict[str, Any] = {"curvature": "hessian", "ihvp": "exact", "damping": 0.01}
NEWTON: dict[str, Any] = {"unlearning": "newton"}


settings, http = e.module_service("hessian")


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    return e.register_toy(settings, http)


def body(ids: dict[str, str], method: str, **params: Any) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": method, "mode": "per_sample",
            "samples": e.samples(2), "top_k": 3, "params": params}


@pytest.mark.parametrize(("method", "params"), [("influence", HESSIAN), ("forward_inf", {**NEWTON, **HESSIAN})])
def test_hessian_queries_succeed_with_the_core_library_scores(
    http: TestClient, ids: dict[str, str], method: str, params: dict[str, Any]
) -> None:
    done = e.run(http, body(ids, method, **params))
    assert done["params"]["curvature"] == "hessian"
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores(method, params, rows=60, queries=e.query_batch(2), per_sample=True)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    gauss_newton = e.direct_scores(method, {**params, "curvature": "gauss_newton"}, rows=60,
                                   queries=e.query_batch(2), per_sample=True)
    assert not np.allclose(served, gauss_newton, rtol=1e-2)


@pytest.mark.parametrize("method", ["influence", "forward_inf"])
def test_hessian_with_a_kronecker_estimator_is_rejected_at_post(http: TestClient, ids: dict[str, str],
                                                                method: str) -> None:
    extra = NEWTON if method == "forward_inf" else {}
    response = http.post("/v1/queries", json=body(ids, method, curvature="hessian", ihvp="ekfac", **extra))
    assert_error(response, 422, "invalid_params", "params.curvature")


def test_an_indefinite_damped_hessian_fails_the_query_with_a_clear_message(http: TestClient,
                                                                           ids: dict[str, str]) -> None:
    """The toy's Hessian has eigenvalues down to about −3e-4; the default damping 0.01·tr(H)/P
    (about 8e-6) leaves H + λI indefinite."""
    response = http.post("/v1/queries", json=body(ids, "influence", curvature="hessian", ihvp="exact"))
    assert response.status_code == 202, response.text
    done = e.wait_done(http, response.json()["id"])
    assert done["status"] == "failed"
    assert done["error"].startswith("NotPositiveDefiniteError: the damped Hessian H + λI")
    assert "raise `damping` or use curvature gauss_newton" in done["error"] and "\n" not in done["error"]
