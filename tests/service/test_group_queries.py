"""Group attribution end to end (embedded mode: SQLite, jobs in the API process):
`group_by` shard / group turns the `[Q, N]` row scores into `[Q, G]` group scores, ranked
and served by `/scores` with their group ids."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service import embedded as e
from tests.service.conftest import assert_error

SIZES = [20, 15, 25]
# Rows 0-19 alternate b/a, rows 20-34 are c, rows 35-59 alternate a/d: groups span shards.
LETTERS = ["b" if i % 2 == 0 else "a" for i in range(20)] + ["c"] * 15 + ["a" if i % 2 == 0 else "d" for i in range(25)]
USER_GROUPS = [f"user-{c}" for c in LETTERS]
FIRST_ROW = {"user-a": 1, "user-b": 0, "user-c": 20, "user-d": 36}


settings, http = e.module_service("groups")


@pytest.fixture(scope="module")
def ids(settings: Settings, http: TestClient) -> dict[str, str]:
    """Model and datasets of tenant a: user groups, integer groups, no group column, one shard without."""
    model = e.register_model(http, e.save_model(settings, e.toy().module, "final.pt"))
    users = e.register_dataset(http, e.write_shards(settings, SIZES, USER_GROUPS, prefix="users"))
    numbers = e.register_dataset(http, e.write_shards(settings, SIZES, [(10, 2, 1)[i % 3] for i in range(60)],
                                                      prefix="numbers"))
    plain = e.register_dataset(http, e.write_shards(settings, SIZES, prefix="plain"))
    partial = e.register_dataset(http, e.write_shards(settings, SIZES, USER_GROUPS, prefix="partial",
                                                      without_group=(1,)))
    return {"model": model, "users": users, "numbers": numbers, "plain": plain, "partial": partial}


def body(ids: dict[str, str], dataset: str = "users", **changes: Any) -> dict[str, Any]:
    query: dict[str, Any] = {"model_id": ids["model"], "dataset_id": ids[dataset], "method": "tracin",
                             "samples": e.samples(2), "top_k": 2}
    query.update(changes)
    return query


def group_means(rows: np.ndarray, labels: list[Any], order: list[Any], reduce: str = "mean") -> np.ndarray:
    """`[..., N]` row scores → `[..., G]` by a plain loop over the groups in `order`."""
    member = np.asarray(labels, dtype=object)
    combine = np.mean if reduce == "mean" else np.sum
    return np.stack([combine(rows[..., member == g], axis=-1) for g in order], axis=-1)


def test_shard_groups_average_or_sum_the_row_scores(http: TestClient, ids: dict[str, str]) -> None:
    rows = np.asarray(e.scores(http, e.run(http, body(ids))["id"])["scores"])
    np.testing.assert_allclose(rows, e.direct_scores("tracin", {}, rows=60, queries=e.query_batch(2))[0],
                               rtol=1e-4, atol=1e-7)
    shard_of = [0] * 20 + [1] * 15 + [2] * 25

    grouped = e.run(http, body(ids, group_by="shard"))
    assert (grouped["group_by"], grouped["group_reduce"]) == ("shard", "mean")
    result = grouped["result"]
    expected = group_means(rows, shard_of, [0, 1, 2])
    served = e.scores(http, grouped["id"])
    assert served["shape"] == [3] and served["groups"] == ["0", "1", "2"]
    np.testing.assert_allclose(served["scores"], expected, rtol=1e-5, atol=1e-9)
    assert result["scores_shape"] == [3] and result["num_scored"] == 60 and result["extras"]["num_groups"] == 3
    order = np.argsort(-expected, kind="stable")
    assert [(r["rank"], r["index"], r["sample_id"], r["shard"]) for r in result["top"]] == [
        (1, int(order[0]), str(order[0]), int(order[0])), (2, int(order[1]), str(order[1]), int(order[1]))]
    assert result["top"][0]["score"] == pytest.approx(float(expected[order[0]]), rel=1e-5)
    assert [r["index"] for r in result["bottom"]] == [int(order[2]), int(order[1])]

    per_sample_rows = np.asarray(e.scores(http, e.run(http, body(ids, mode="per_sample"))["id"])["scores"])
    summed = e.run(http, body(ids, mode="per_sample", group_by="shard", group_reduce="sum"))
    matrix = e.scores(http, summed["id"])
    assert matrix["shape"] == [2, 3] and summed["result"]["scores_shape"] == [2, 3]
    np.testing.assert_allclose(matrix["scores"], group_means(per_sample_rows, shard_of, [0, 1, 2], "sum"),
                               rtol=1e-5, atol=1e-8)
    second = summed["result"]["per_sample"][1]
    assert second["sample"] == 1 and second["top"][0]["index"] == int(np.argmax(matrix["scores"][1]))


def test_group_column_groups_are_ordered_by_id(http: TestClient, ids: dict[str, str]) -> None:
    rows = np.asarray(e.scores(http, e.run(http, body(ids))["id"])["scores"])
    grouped = e.run(http, body(ids, group_by="group", top_k=4))
    order = ["user-a", "user-b", "user-c", "user-d"]
    expected = group_means(rows, USER_GROUPS, order)
    served = e.scores(http, grouped["id"])
    assert served["groups"] == order and served["shape"] == [4]
    np.testing.assert_allclose(served["scores"], expected, rtol=1e-5, atol=1e-9)
    ranked = np.argsort(-expected, kind="stable")
    top = grouped["result"]["top"]
    assert [r["index"] for r in top] == ranked.tolist()
    assert [r["sample_id"] for r in top] == [order[g] for g in ranked]
    assert [r["shard"] for r in top] == [0 if FIRST_ROW[order[g]] < 20 else 1 if FIRST_ROW[order[g]] < 35 else 2
                                         for g in ranked]

    as_csv = http.get(f"/v1/queries/{grouped['id']}/scores", params={"format": "csv"})
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0] == ["index", "group", "score"] and [r[:2] for r in table[1:]] == [
        [str(g), label] for g, label in enumerate(order)]
    as_npy = np.load(io.BytesIO(http.get(f"/v1/queries/{grouped['id']}/scores", params={"format": "npy"}).content))
    np.testing.assert_allclose(as_npy, expected, rtol=1e-5, atol=1e-9)

    numbers_rows = np.asarray(e.scores(http, e.run(http, body(ids, "numbers"))["id"])["scores"])
    numeric = e.run(http, body(ids, "numbers", group_by="group", group_reduce="sum"))
    served = e.scores(http, numeric["id"])
    assert served["groups"] == ["1", "2", "10"]  # integer ids: numeric order, not "1" < "10" < "2"
    np.testing.assert_allclose(served["scores"], group_means(numbers_rows, [(10, 2, 1)[i % 3] for i in range(60)],
                                                             [1, 2, 10], "sum"), rtol=1e-5, atol=1e-8)


def test_self_influence_by_shard(http: TestClient, ids: dict[str, str]) -> None:
    done = e.run(http, body(ids, samples=None, self_influence=True, group_by="shard"))
    expected = e.direct_scores("tracin", {}, rows=60, queries=None, self_influence=True)[0]
    np.testing.assert_allclose(e.scores(http, done["id"])["scores"],
                               [expected[:20].mean(), expected[20:35].mean(), expected[35:].mean()], rtol=1e-4)


def test_group_by_is_part_of_the_request(http: TestClient, ids: dict[str, str]) -> None:
    row = e.run(http, body(ids, top_k=3))
    again = http.post("/v1/queries", json=body(ids, top_k=3, group_reduce="sum")).json()
    assert again["cached"] is True and again["source_query_id"] == row["id"]  # rows ignore group_reduce
    by_shard = http.post("/v1/queries", json=body(ids, top_k=3, group_by="shard")).json()
    assert by_shard["cached"] is False
    assert e.wait_done(http, by_shard["id"])["status"] == "succeeded"
    repeated = http.post("/v1/queries", json=body(ids, top_k=3, group_by="shard")).json()
    assert repeated["cached"] is True and repeated["source_query_id"] == by_shard["id"]
    assert repeated["group_by"] == "shard" and e.scores(http, repeated["id"])["shape"] == [3]
    summed = http.post("/v1/queries", json=body(ids, top_k=3, group_by="shard", group_reduce="sum")).json()
    assert summed["cached"] is False
    e.wait_done(http, summed["id"])


def test_invalid_group_requests_name_the_field(http: TestClient, ids: dict[str, str]) -> None:
    assert_error(http.post("/v1/queries", json=body(ids, "plain", group_by="group")), 422, "invalid_input",
                 mentions="group_by: 'group' needs a `group` column in every shard")
    error = assert_error(http.post("/v1/queries", json=body(ids, "partial", group_by="group")), 422,
                         mentions="group_by")
    assert "shards[1]" in error["detail"]
    assert_error(http.post("/v1/queries", json=body(ids, group_by="user")), 422, mentions="group_by")
    assert_error(http.post("/v1/queries", json=body(ids, group_by="shard", group_reduce="max")), 422,
                 mentions="group_reduce")
    assert e.run(http, body(ids, "partial", group_by="shard"))["result"]["scores_shape"] == [3]


def test_jobs_use_the_apps_settings_not_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`create_app(Settings(...))` in embedded mode: the in-process job reads the app's
    database and data root even though the environment names another data root."""
    from service.settings import get_settings

    elsewhere = tmp_path / "environment-root"
    elsewhere.mkdir()
    monkeypatch.setenv("DATA_ROOT", str(elsewhere))
    for name in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    try:
        settings = e.embedded_settings(tmp_path / "app-root")
        with e.client(settings) as http:
            model = e.register_model(http, e.save_model(settings, e.toy().module, "final.pt"))
            dataset = e.register_dataset(http, e.write_shards(settings, SIZES, USER_GROUPS))
            done = e.run(http, {"model_id": model, "dataset_id": dataset, "method": "tracin",
                                "samples": e.samples(1), "group_by": "group"})
            assert e.scores(http, done["id"])["shape"] == [4]
        assert get_settings().data_root == elsewhere.resolve()
        assert not (elsewhere / ".service" / "scores").exists()
    finally:
        get_settings.cache_clear()
