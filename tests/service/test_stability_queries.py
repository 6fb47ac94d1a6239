"""Rank stability through the API (embedded mode): the request field and its 422s, the
figures on every ranked row equal the core library's, the CSV export and the result page
carry them, and the request takes part in the request hash."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from attribution.artifacts import InMemoryArtifacts
from attribution.data import TensorTrainingSet
from attribution.methods.base import AttributionMethod, FitContext
from attribution.methods.limits import MAXIMUMS
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.stability import StabilityParams, StabilityReport, rank_stability
from attribution.tasks import ClassificationTask
from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error

settings, http = e.module_service("stability")

TRACIN = {"projection_dim": 4, "normalize": "relative"}


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    return e.register_toy(settings, http)


def body(ids: dict[str, str], *, method: str = "tracin", params: dict[str, Any] | None = None,
         stability: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    request = {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": method, "samples": e.samples(2),
               "top_k": 4, "params": TRACIN if params is None else params, **extra}
    if stability is not None:
        request["stability"] = stability
    return request


def direct(params: dict[str, Any], resamples: int, k: int, *, per_sample: bool = False) -> StabilityReport:
    """The same figures from `attribution.stability`, without the service."""
    data, task = e.toy(), ClassificationTask()
    train = TensorTrainingSet(torch.from_numpy(data.x[:60]), torch.from_numpy(data.y[:60]))
    fitted: list[AttributionMethod] = []
    queries = e.query_batch(2)
    scores = attribute(ModelAdapter(data.module, task), "tracin", params, train, FitContext("direct", InMemoryArtifacts()),
                       queries=queries, per_sample=per_sample, on_fitted=fitted.append)
    return rank_stability(fitted[0], scores.float(), train, StabilityParams(resamples), queries=queries, k=k,
                          per_sample=per_sample)


def rows_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(kind, row) for kind in ("top", "bottom") for row in result[kind]]


def test_every_ranked_row_carries_the_library_figures(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids, stability={"resamples": 6}))
    assert done["stability"] == {"resamples": 6}
    result = done["result"]
    assert result["extras"]["stability"]["resampling"] == "projection_seed"
    assert result["extras"]["stability"]["values"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # seeds 0 + 1 … 0 + 6
    expected = direct(TRACIN, 6, 4)
    assert expected.rows, "nothing ranked"
    for kind, row in rows_of(result):
        figures = expected.get(kind, 0, row["index"])
        assert figures is not None
        assert (row["stability"], row["rank_low"], row["rank_high"]) == pytest.approx(
            (figures.stability, figures.rank_low, figures.rank_high)), (kind, row)
    assert any(row["stability"] < 1.0 for _, row in rows_of(result)), "a 4-dim projection of 60 rows never moves a rank"


def test_per_sample_rankings_each_carry_figures(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids, stability={"resamples": 3}, mode="per_sample"))
    expected = direct(TRACIN, 3, 4, per_sample=True)
    for ranking in done["result"]["per_sample"]:
        for kind, row in rows_of(ranking):
            figures = expected.get(kind, ranking["sample"], row["index"])
            assert figures is not None and row["stability"] == pytest.approx(figures.stability)
    header = http.get(f"/v1/queries/{done['id']}/scores?format=csv").text.splitlines()[0]
    assert header == ("index,sample_0,sample_1,stability_0,rank_low_0,rank_high_0,"
                      "stability_1,rank_low_1,rank_high_1")


def test_without_the_field_rows_have_null_figures_and_the_csv_no_columns(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids))
    assert done["stability"] is None and "stability" not in done["result"]["extras"]
    assert all(row["stability"] is None and row["rank_low"] is None for _, row in rows_of(done["result"]))
    header = http.get(f"/v1/queries/{done['id']}/scores?format=csv").text.splitlines()[0]
    assert header == "index,score"


def test_csv_export_includes_the_figures_of_ranked_rows(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids, stability={"resamples": 4}))
    response = http.get(f"/v1/queries/{done['id']}/scores?format=csv")
    assert response.status_code == 200
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert list(table[0]) == ["index", "score", "stability", "rank_low", "rank_high"]
    ranked = {row["index"]: row for row in done["result"]["bottom"] + done["result"]["top"]}  # top wins
    assert sum(line["stability"] != "" for line in table) == len(ranked) == 8
    for line in table:
        row = ranked.get(int(line["index"]))
        if row is None:
            assert (line["stability"], line["rank_low"], line["rank_high"]) == ("", "", "")
        else:
            assert float(line["stability"]) == pytest.approx(row["stability"], abs=1e-6)
            assert (int(line["rank_low"]), int(line["rank_high"])) == (row["rank_low"], row["rank_high"])


def test_result_page_shows_the_stability_column(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids, stability={"resamples": 4}))
    page = http.get(f"/ui/queries/{done['id']}").text
    assert "<th class=\"num\" title=\"share of resamples keeping the row in the top k\">stability</th>" in page
    first = done["result"]["top"][0]
    assert f'data-stability="{first["stability"]}"' in page
    assert f"{first['rank_low']}–{first['rank_high']}" in page and 'id="stability-note"' in page
    plain = e.run(http, body(ids, top_k=3))
    assert "rank interval" not in http.get(f"/ui/queries/{plain['id']}").text


def test_the_request_is_part_of_the_hash(http: TestClient, ids: dict[str, str]) -> None:
    asked = e.run(http, body(ids, stability={"resamples": 5}, top_k=2))
    again = http.post("/v1/queries", json=body(ids, stability={"resamples": 5}, top_k=2)).json()
    assert again["cached"] is True and again["status"] == "succeeded"
    assert [row["stability"] for row in again["result"]["top"]] == [row["stability"] for row in asked["result"]["top"]]
    other = http.post("/v1/queries", json=body(ids, stability={"resamples": 4}, top_k=2)).json()
    plain = http.post("/v1/queries", json=body(ids, top_k=2)).json()
    assert other["cached"] is False and plain["cached"] is False


@pytest.mark.parametrize(("request_extra", "detail"), [
    ({"stability": {"resamples": MAXIMUMS["resamples"] + 1}}, f"stability.resamples: must be at most {MAXIMUMS['resamples']}"),
    ({"stability": {"resamples": 1}}, "stability.resamples: must be at least 2"),
    ({"stability": {"resamples": 4, "seeds": [1]}}, "stability.seeds: unknown field"),
    ({"stability": {"resamples": 4}, "params": {}}, "stability: tracin without projection_dim"),
    ({"stability": {"resamples": 4}, "method": "gradient_similarity", "params": {}},
     "stability: gradient_similarity without projection_dim"),
    ({"stability": {"resamples": 4}, "group_by": "shard"}, "stability: ranks rows"),
    ({"stability": {"resamples": 4}, "method": "trak", "params": {}}, "stability: params.projection_dim 2048 ≥ the model's"),
])
def test_invalid_requests_are_422_naming_the_field(http: TestClient, ids: dict[str, str],
                                                   request_extra: dict[str, Any], detail: str) -> None:
    request = {**body(ids), **request_extra}
    assert_error(http.post("/v1/queries", json=request), 422, mentions=detail)


def test_self_influence_audits_take_stability_too(http: TestClient, ids: dict[str, str]) -> None:
    request = {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "tracin", "self_influence": True,
               "top_k": 3, "params": {"projection_dim": 4}, "stability": {"resamples": 3}}
    done = e.run(http, request)
    rows = rows_of(done["result"])
    assert len(rows) == 6 and all(0.0 <= row["stability"] <= 1.0 and row["rank_low"] <= row["rank_high"]
                                  for _, row in rows)
    assert done["result"]["extras"]["stability"]["resampling"] == "projection_seed"
