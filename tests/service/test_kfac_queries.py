"""K-FAC/EK-FAC through the API on TorchScript models (embedded mode): a linear TorchScript
model is accepted and scored as its eager original is; a model with a TorchScript convolution
is refused at POST with a 422 naming the layers that work, and so are `layers` that select
nothing — from the structure recorded at registration, before anything is queued."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error
from tests.workers import support

settings, http = e.module_service("kfac")


class ConvHead(nn.Module):
    """The toy's 6 features as a 1×2×3 image, a 1×1 convolution, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(12, support.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x.reshape(x.shape[0], 1, 2, 3))).flatten(1))


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    torch.manual_seed(0)
    ids = e.register_toy(settings, http)
    ids["conv"] = e.register_model(http, e.save_model(settings, ConvHead(), "conv.pt"))
    return ids


def body(ids: dict[str, str], model: str = "model", **params: Any) -> dict[str, Any]:
    return {"model_id": ids[model], "dataset_id": ids["dataset"], "method": "influence", "mode": "per_sample",
            "samples": e.samples(2), "top_k": 3, "params": params}


@pytest.mark.parametrize("ihvp", ["kfac", "ekfac"])
def test_a_torchscript_linear_model_is_scored_like_its_eager_original(http: TestClient, ids: dict[str, str],
                                                                       ihvp: str) -> None:
    params = {"ihvp": ihvp, "damping": 0.01}
    done = e.run(http, body(ids, **params))
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("influence", params, rows=60, queries=e.query_batch(2), per_sample=True)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("ihvp", ["kfac", "ekfac"])
def test_a_torchscript_convolution_is_refused_at_post_naming_what_works(http: TestClient, ids: dict[str, str],
                                                                         ihvp: str) -> None:
    detail = assert_error(http.post("/v1/queries", json=body(ids, "conv", ihvp=ihvp)), 422, "invalid_params",
                          "params.ihvp")["detail"]
    assert "conv.weight" in detail and "['head']" in detail and "cg" in detail
    assert e.run(http, body(ids, "conv", ihvp=ihvp, layers=["head"]))["status"] == "succeeded"
    assert e.run(http, body(ids, "conv", ihvp="auto"))["status"] == "succeeded"


def test_layers_that_select_nothing_are_refused_at_post(http: TestClient, ids: dict[str, str]) -> None:
    assert_error(http.post("/v1/queries", json=body(ids, layers=["nope"])), 422, "invalid_params", "params.layers")
