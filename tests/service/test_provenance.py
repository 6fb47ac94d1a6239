"""Every computed result carries its provenance (model and dataset hashes, resolved params,
code version, worker host and device, timings), written once; cached answers show the
computing query's record."""

from __future__ import annotations

import socket

from fastapi.testclient import TestClient

from service.db.models import Query
from service.db.repositories import jobs as job_repo
from service.db.session import session_scope
from service.settings import Settings
from service.version import package_version
from tests.service import embedded as e

settings, http = e.module_service("provenance")


def test_result_records_what_produced_it(settings: Settings, http: TestClient) -> None:
    ids = e.register_toy(settings, http)
    body = {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "forward_inf",
            "samples": e.samples(1), "top_k": 3, "params": {"steps": 2}}
    done = e.run(http, body)
    record = done["result"]["provenance"]
    model, dataset = http.get(f"/v1/models/{ids['model']}").json(), http.get(f"/v1/datasets/{ids['dataset']}").json()
    assert record["model"] == {"id": model["id"], "sha256": model["sha256"], "format": "torchscript",
                               "task": "classification", "num_parameters": model["num_parameters"]}
    assert record["dataset"] == {"id": dataset["id"], "sha256": dataset["sha256"], "num_samples": 60}
    assert record["method"] == "forward_inf" and record["params"] == done["params"] and record["params"]["steps"] == 2
    assert record["worker"]["device"] == "cpu" and record["worker"]["host"] == socket.gethostname()
    assert record["code"]["version"] == package_version() and record["num_parts"] == 1
    assert record["timings"] == done["result"]["timings"] and record["timings"]["total_s"] > 0

    repeat = http.post("/v1/queries", json=body).json()
    assert repeat["cached"] and repeat["result"]["provenance"] == record


def test_provenance_is_written_once(settings: Settings, http: TestClient) -> None:
    ids = e.register_toy(settings, http)
    done = e.run(http, {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "forward_inf",
                        "samples": e.samples(2), "top_k": 2})
    with session_scope(settings) as session:
        stale = job_repo.QueryOutcome(rows=[], num_scored=0, scores_path="x.npy", scores_shape=[0], timings={},
                                      extras={}, provenance={"forged": True})
        assert not job_repo.complete(session, done["id"], stale)  # only a running query completes
    with session_scope(settings) as session:
        stored = session.get(Query, done["id"])
        assert stored is not None and stored.provenance == done["result"]["provenance"]
