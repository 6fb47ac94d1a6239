"""`method: "auto"` (the default) through the API, embedded mode: each (task, purpose,
checkpoints) resolves as `attribution.methods.auto` documents, runs, and reports its choice in
the query's `auto` field and `result.extras.auto`; cache and Idempotency-Key treat auto
requests as their own; bad names and params answer 422."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.language_models import CORPUS, PROMPTS, causal_lm, save_folder, write_jsonl
from tests.service import embedded as e
from tests.service.conftest import assert_error
from tests.workers import support


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return e.embedded_settings(tmp_path_factory.mktemp("auto") / "data")


@pytest.fixture(scope="module")
def http(settings: Settings) -> Iterator[TestClient]:
    with e.client(settings) as client:
        yield client


@pytest.fixture(scope="module")
def earlier() -> list[torch.nn.Module]:
    """Two earlier checkpoints of the toy classifier's architecture."""
    return [support.toy_problem(n=60, seed=1).module, support.toy_problem(n=60, seed=2).module]


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient, earlier: list[torch.nn.Module]) -> dict[str, Any]:
    return {
        "model": e.register_model(http, e.save_model(settings, e.toy().module, "final.pt")),
        "dataset": e.register_dataset(http, e.write_shards(settings, [30, 30])),
        "checkpoints": [e.register_model(http, e.save_model(settings, m, f"ckpt-{i}.pt")) for i, m in enumerate(earlier)],
    }


def prediction(ids: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A query about predictions with no `method`: auto by default."""
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "samples": e.samples(2), "top_k": 3, **changes}


def audit(ids: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"model_id": ids["model"], "dataset_id": ids["dataset"], "self_influence": True, "top_k": 5,
            "method": "auto", "params": params}


def assert_reported(done: dict[str, Any], method: str) -> dict[str, Any]:
    """The choice shows in `method`, `params`, `auto` and `result.extras.auto` alike."""
    choice: dict[str, Any] = done["auto"]
    assert done["method"] == method and choice["method"] == method
    assert choice["params"] == done["params"] == done["result"]["params"]
    assert done["result"]["extras"]["auto"] == choice
    assert "benchmarks/results/" in choice["reason"]  # the report the rule comes from
    return choice


def test_a_classifier_prediction_query_resolves_to_forward_inf_defaults(http: TestClient,
                                                                        ids: dict[str, Any]) -> None:
    done = e.run(http, prediction(ids))
    choice = assert_reported(done, "forward_inf")
    assert choice["params"]["normalize"] == "relative"  # Forward-INF's own defaults, untouched
    assert "q3_leakage.md" in choice["reason"]
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("forward_inf", {}, rows=60, queries=e.query_batch(2))[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    # checkpoints do not change a prediction query's choice: the same request, answered from the first
    with_checkpoints = http.post("/v1/queries", json=prediction(
        ids, method="auto", params={"checkpoint_model_ids": ids["checkpoints"]})).json()
    assert with_checkpoints["cached"] is True and with_checkpoints["auto"] == choice
    assert "not used" in choice["reason"]


def test_a_self_influence_audit_with_checkpoints_resolves_to_newton_forward_inf_over_them(
        http: TestClient, ids: dict[str, Any], earlier: list[torch.nn.Module]) -> None:
    lrs = [0.5, 0.25]
    done = e.run(http, audit(ids, checkpoint_model_ids=ids["checkpoints"], checkpoint_lrs=lrs))
    choice = assert_reported(done, "forward_inf")
    assert choice["params"]["unlearning"] == "newton"
    assert choice["params"]["checkpoint_model_ids"] == ids["checkpoints"] and choice["params"]["checkpoint_lrs"] == lrs
    assert "q4_mislabel.md" in choice["reason"]
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("forward_inf", {"unlearning": "newton"}, rows=60, queries=None, checkpoints=earlier,
                               checkpoint_lrs=lrs, self_influence=True)[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-7)
    final_only = e.direct_scores("forward_inf", {"unlearning": "newton"}, rows=60, queries=None,
                                 self_influence=True)[0]
    assert not np.allclose(served, final_only, rtol=1e-2)  # summed over the checkpoints, as documented


def test_a_self_influence_audit_without_checkpoints_resolves_to_trak_without_margin(
        http: TestClient, ids: dict[str, Any]) -> None:
    done = e.run(http, audit(ids))
    choice = assert_reported(done, "trak")
    assert choice["params"]["use_margin"] is False and choice["params"]["checkpoint_model_ids"] == []
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("trak", {"use_margin": False}, rows=60, queries=None, self_influence=True)[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-7)


def test_a_counterfactual_goal_resolves_to_raw_influence_and_audits_refuse_a_goal(
        http: TestClient, ids: dict[str, Any]) -> None:
    done = e.run(http, prediction(ids, method="auto", params={"goal": "counterfactual"}))
    choice = assert_reported(done, "influence")
    assert choice["params"]["normalize"] == "none" and choice["params"]["relative_damping"] == 1.0
    assert "q6_lds_neural.md" in choice["reason"]
    served = np.asarray(e.scores(http, done["id"])["scores"])
    expected = e.direct_scores("influence", {"normalize": "none", "relative_damping": 1.0}, rows=60,
                               queries=e.query_batch(2))[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    refused = http.post("/v1/queries", json={**audit(ids), "params": {"goal": "counterfactual"}})
    assert_error(refused, 422, "invalid_params", "params.goal: applies to queries about predictions")
    assert_error(http.post("/v1/queries", json=prediction(ids, method="auto", params={"goal": "why"})), 422,
                 "invalid_params", "params.goal")


def test_auto_requests_are_cached_and_replayed_as_auto_requests(http: TestClient, ids: dict[str, Any]) -> None:
    first = e.run(http, prediction(ids, samples=e.samples(3)))
    again = http.post("/v1/queries", json=prediction(ids, method="auto", samples=e.samples(3))).json()
    assert again["cached"] is True and again["source_query_id"] == first["id"]
    assert again["auto"] == first["auto"] and again["result"]["extras"]["auto"] == first["auto"]
    # the same method and params named explicitly: its own request (computed, no auto record)
    explicit = e.run(http, prediction(ids, samples=e.samples(3), method="forward_inf"))
    assert explicit["cached"] is False and explicit["auto"] is None and "auto" not in explicit["result"]["extras"]
    np.testing.assert_array_equal(e.scores(http, explicit["id"])["scores"], e.scores(http, first["id"])["scores"])
    body = prediction(ids, samples=e.samples(1))
    one = http.post("/v1/queries", json=body, headers={"Idempotency-Key": "auto-key-1"})
    two = http.post("/v1/queries", json=body, headers={"Idempotency-Key": "auto-key-1"})
    assert one.status_code == two.status_code == 202 and one.json()["id"] == two.json()["id"]
    assert one.json()["auto"]["method"] == "forward_inf"  # visible at once, before the result
    clash = http.post("/v1/queries", json={**body, "method": "forward_inf"}, headers={"Idempotency-Key": "auto-key-1"})
    assert_error(clash, 409, "idempotency_key_reused")
    e.wait_done(http, one.json()["id"])


def test_unknown_methods_list_auto_and_auto_refuses_method_params(http: TestClient, ids: dict[str, Any]) -> None:
    detail = assert_error(http.post("/v1/queries", json=prediction(ids, method="fwd")), 422, "unknown_method")["detail"]
    assert "auto" in detail and "forward_inf" in detail and "tracin" in detail
    for params, field in (({"steps": 3}, "steps"), ({"normalize": "none"}, "normalize"),
                          ({"checkpoint_model_ids": [""]}, "checkpoint_model_ids")):
        refused = assert_error(http.post("/v1/queries", json=prediction(ids, method="auto", params=params)), 422,
                               "invalid_params")
        assert field in refused["detail"]
    unknown = audit(ids, checkpoint_model_ids=["no-such-model"])
    assert "unknown model" in assert_error(http.post("/v1/queries", json=unknown), 422, "invalid_params")["detail"]
    unused = prediction(ids, method="auto", params={"checkpoint_model_ids": [ids["checkpoints"][0], "no-such-model"]})
    assert_error(http.post("/v1/queries", json=unused), 422, "invalid_params", "checkpoint_model_ids[1]")


def test_causal_lm_queries_resolve_to_forward_inf_lm_defaults_and_audits_to_tracin(
        http: TestClient, settings: Settings) -> None:
    root = settings.data_root / "lm"
    folder = save_folder(causal_lm("gpt2"), root / "model")
    text = write_jsonl(root / "text.jsonl", [{"text": t} for t in CORPUS])
    instructions = root / "instructions.parquet"
    pq.write_table(pa.table({"prompt": [p for p, _ in PROMPTS], "completion": [c for _, c in PROMPTS]}), instructions)
    model = http.post("/v1/models", json={"name": "gpt2", "uri": folder.as_uri(), "format": "hf",
                                          "task": "causal_lm"})
    dataset = http.post("/v1/datasets", json={"name": "lm", "shards": [{"uri": text.as_uri()},
                                                                       {"uri": instructions.as_uri()}]})
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    prompt, completion = PROMPTS[1]
    done = e.run(http, {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], "top_k": 2,
                        "samples": {"prompt": [prompt], "completion": [completion]}})
    choice = assert_reported(done, "forward_inf")
    assert (choice["params"]["stop"], choice["params"]["steps"], choice["params"]["normalize"]) == (
        "fixed", 20, "relative")  # the causal-LM defaults
    assert "q8_service.md" in choice["reason"]
    top = done["result"]["top"][0]
    assert (top["index"], top["preview"]) == (len(CORPUS) + 1, prompt + completion)
    # an LM audit without checkpoints: TracIn on the final model, every layer
    audited = e.run(http, {"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], "top_k": 3,
                           "self_influence": True})
    choice = assert_reported(audited, "tracin")
    assert choice["params"]["last_layer"] is False and choice["params"]["checkpoint_model_ids"] == []
