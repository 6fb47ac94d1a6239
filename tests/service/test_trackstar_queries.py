"""TrackStar through the API (embedded mode): served scores equal the core library's, the
training features are built once as files under the service's features directory and
reused by later queries, and `params.optimizer_state` is checked at POST and used by the job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from attribution.data import TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.methods.trackstar import FEATURES_KIND
from attribution.model import ModelAdapter
from attribution.optimizer_state import SecondMoment
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error

settings, http = e.module_service("trackstar")


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    return e.register_toy(settings, http)


@pytest.fixture(scope="module")
def exp_avg_sq(settings: Settings) -> Iterator[Path]:
    """A made-up Adam second moment of the toy model, as a safetensors file in the data root."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.rand(p.shape, generator=generator) * 1e-3 for name, p in e.toy().module.named_parameters()}
    path = settings.data_root / "exp_avg_sq.safetensors"
    save_file(tensors, str(path))
    yield path


def body(ids: dict[str, str], samples: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "trackstar", "samples": samples,
            "top_k": 3, "params": params}


def direct(params: dict[str, Any], second_moment: SecondMoment | None = None) -> np.ndarray:
    data = e.toy()
    train = TensorTrainingSet(torch.from_numpy(data.x[:60]), torch.from_numpy(data.y[:60]))
    context = FitContext("direct", second_moment=second_moment)
    return attribute(ModelAdapter(data.module, ClassificationTask()), "trackstar", params, train, context,
                     queries=e.query_batch(2)).numpy()[0]


def test_served_scores_equal_the_library_and_features_are_built_once(
    settings: Settings, http: TestClient, ids: dict[str, str]
) -> None:
    first = e.run(http, body(ids, e.samples(2), fit_rows=40))
    assert first["result"]["extras"]["trackstar_features"] == "built"
    served = np.asarray(e.scores(http, first["id"])["scores"])
    np.testing.assert_allclose(served, direct({"fit_rows": 40}), rtol=1e-4, atol=1e-5)
    entries = list((settings.features_dir / FEATURES_KIND).iterdir())
    assert len(entries) == 1 and (entries[0] / "features.npy").is_file() and (entries[0] / "arguments.json").is_file()
    modified = (entries[0] / "features.npy").stat().st_mtime_ns

    data = e.toy()  # a new query: an exact copy of training row 17
    copy = e.run(http, body(ids, {"x": data.x[17:18].tolist(), "y": data.y[17:18].tolist()}, fit_rows=40))
    assert copy["result"]["extras"]["trackstar_features"] == "reused"
    assert copy["result"]["top"][0]["index"] == 17
    assert copy["result"]["top"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert list((settings.features_dir / FEATURES_KIND).iterdir()) == entries
    assert (entries[0] / "features.npy").stat().st_mtime_ns == modified


def test_registered_optimizer_state_is_used(http: TestClient, ids: dict[str, str], exp_avg_sq: Path) -> None:
    done = e.run(http, body(ids, e.samples(2), optimizer_state=exp_avg_sq.as_uri()))
    assert done["result"]["extras"]["trackstar_second_moment"] == "optimizer_state"
    served = np.asarray(e.scores(http, done["id"])["scores"])
    moment = SecondMoment.from_safetensors(exp_avg_sq, "direct")
    np.testing.assert_allclose(served, direct({"optimizer_state": exp_avg_sq.as_uri()}, moment), rtol=1e-4, atol=1e-5)
    assert not np.allclose(served, direct({}), atol=1e-3)  # the file, not the estimate, was used
    repeated = http.post("/v1/queries", json=body(ids, e.samples(2), optimizer_state=exp_avg_sq.as_uri())).json()
    assert repeated["cached"] is True


@pytest.mark.parametrize(("uri", "mentions"), [
    ("file:///etc/hostname", "outside the server's data root"),
    ("http://example.com/v.safetensors", "file:// URI"),
    ("<junk>", "not a safetensors file"),
    ("/no/scheme.safetensors", "file:// URI"),
])
def test_bad_optimizer_state_is_422(settings: Settings, http: TestClient, ids: dict[str, str], uri: str,
                                    mentions: str) -> None:
    if uri == "<junk>":
        junk = settings.data_root / "junk.safetensors"
        junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
        uri, mentions = junk.as_uri(), "cannot read the file as safetensors"
    error = assert_error(http.post("/v1/queries", json=body(ids, e.samples(1), optimizer_state=uri)), 422,
                         mentions="params.optimizer_state")
    assert mentions in error["detail"], error


def test_optimizer_state_of_another_model_fails_the_query_with_a_clear_error(
    settings: Settings, http: TestClient, ids: dict[str, str]
) -> None:
    path = settings.data_root / "other.safetensors"
    save_file({"encoder.weight": torch.ones(2, 2)}, str(path))
    response = http.post("/v1/queries", json=body(ids, e.samples(1), optimizer_state=path.as_uri()))
    assert response.status_code == 202, response.text
    done = e.wait_done(http, response.json()["id"])
    assert done["status"] == "failed"
    assert "no second moment for parameter '0.weight'" in done["error"], done["error"]


def test_relative_and_self_influence_are_refused(http: TestClient, ids: dict[str, str]) -> None:
    assert_error(http.post("/v1/queries", json=body(ids, e.samples(1), normalize="relative")), 422,
                 "invalid_params", mentions="params.normalize")
    response = http.post("/v1/queries", json={"model_id": ids["model"], "dataset_id": ids["dataset"],
                                               "method": "trackstar", "self_influence": True})
    assert_error(response, 422, mentions="self_influence")
