"""`method: "auto"` on Postgres + Redis: submitted over HTTP, run by an RQ worker (the job
reads the choice stored at submission); the result's extras keep the `auto` record beside
the method's own extras, and a repeat is answered from the store with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from attribution.artifacts import InMemoryArtifacts
from attribution.data import TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from service.api.app import create_app
from service.settings import Settings
from tests.workers import jobfixtures as jf
from tests.workers import support

pytestmark = pytest.mark.integration


def test_an_auto_audit_with_checkpoints_runs_on_a_queue_worker(rq_settings: Settings) -> None:
    toy = support.toy_problem(n=60)
    root = rq_settings.data_root
    earlier = support.toy_problem(n=60, seed=1).module
    shards = support.write_npz_shards(root, toy.x, toy.y, [30, 30])
    with TestClient(create_app(rq_settings), raise_server_exceptions=False) as http:
        def register(path: str) -> str:
            response = http.post("/v1/models", json={"name": path, "uri": (root / path).as_uri(),
                                                     "format": "torchscript", "task": "classification"})
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        support.save_torchscript(toy.module, root / "final.pt")
        support.save_torchscript(earlier, root / "earlier.pt")
        model, checkpoint = register("final.pt"), register("earlier.pt")
        dataset = http.post("/v1/datasets", json={"name": "t", "shards": [{"uri": p.as_uri()} for p in shards]})
        assert dataset.status_code == 201, dataset.text
        body = {"model_id": model, "dataset_id": dataset.json()["id"], "self_influence": True, "top_k": 4,
                "params": {"checkpoint_model_ids": [checkpoint, model]}}
        queued = http.post("/v1/queries", json=body)
        assert queued.status_code == 202, queued.text
        assert queued.json()["method"] == "forward_inf" and queued.json()["auto"]["params"]["unlearning"] == "newton"
        jf.work(rq_settings)
        done = http.get(f"/v1/queries/{queued.json()['id']}").json()
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["extras"]["auto"] == done["auto"] == queued.json()["auto"]
        scores = np.asarray(http.get(f"/v1/queries/{done['id']}/scores").json()["scores"])
        repeat = http.post("/v1/queries", json=body).json()
        assert repeat["cached"] is True and repeat["result"]["extras"]["auto"] == done["auto"]

    task = ClassificationTask()
    context = FitContext("direct", store=InMemoryArtifacts(),
                         checkpoints=[ModelAdapter(earlier, task), ModelAdapter(toy.module, task)])
    expected = attribute(ModelAdapter(toy.module, task), "forward_inf",
                         {"unlearning": "newton", "checkpoint_model_ids": ["a", "b"]},
                         TensorTrainingSet(torch.from_numpy(toy.x), torch.from_numpy(toy.y)), context,
                         queries=None, self_influence=True)[0].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-7)
