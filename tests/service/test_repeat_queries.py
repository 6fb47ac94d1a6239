"""Repeat queries answered from a stored result: the answer is built from the ranked rows
the copy returned (no read-back), so it must equal what a later GET reads back, and the
request must stay a handful of statements.

No worker runs here: a succeeded query is simulated by `finish` (result rows and score
file through the job repository, as a job writes them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text

from service.api import query_validation
from service.db.session import get_engine, session_scope
from service.settings import Settings
from tests.service.conftest import assert_error, query_body, register_dataset, register_model
from tests.service.test_queries import NUM_ROWS, finish, submit

pytestmark = pytest.mark.integration

PER_SAMPLE = {"samples": {"x": [[0.1, 0.2, 0.3, 0.4], [-0.5, 0.0, 0.5, 1.0], [1.0, 1.0, 0.0, -1.0]],
                          "y": [0, 2, 1]},
              "mode": "per_sample"}


@pytest.fixture()
def statements(settings: Settings) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the test runs (the pool's ping excepted)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement.split()[0].upper())

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine, "before_cursor_execute", record)


def _scores() -> np.ndarray:
    """`[3, N]`: sample 0 ranks rows ascending, sample 1 descending, sample 2 a permutation."""
    rows = np.arange(NUM_ROWS, dtype=np.float64)
    return np.stack([rows, -rows, np.random.default_rng(0).permutation(rows)])


@pytest.mark.parametrize("changes", [{}, PER_SAMPLE], ids=["joint", "per_sample"])
def test_cached_answer_is_exactly_what_get_reads_back(
    client: TestClient, settings: Settings, registered: tuple[str, str], changes: dict[str, Any]
) -> None:
    original = submit(client, query_body(*registered, **changes))["id"]
    finish(settings, original, _scores() if changes else np.arange(NUM_ROWS, dtype=np.float64))

    cached = submit(client, query_body(*registered, **changes))
    assert cached["cached"] is True and cached["status"] == "succeeded" and cached["id"] != original
    assert cached == client.get(f"/v1/queries/{cached['id']}").json()  # every field, every ranked row
    stored = client.get(f"/v1/queries/{original}").json()
    assert cached["result"] == stored["result"] and cached["params"] == stored["params"]
    if changes:
        assert [s["sample"] for s in cached["result"]["per_sample"]] == [0, 1, 2]
        assert [r["index"] for r in cached["result"]["per_sample"][1]["top"]] == [0, 1, 2]
        assert [r["rank"] for r in cached["result"]["per_sample"][2]["bottom"]] == [1, 2, 3]


def test_cached_answer_with_an_idempotency_key_is_replayed_unchanged(
    client: TestClient, settings: Settings, registered: tuple[str, str]
) -> None:
    finish(settings, submit(client, query_body(*registered))["id"], np.arange(NUM_ROWS, dtype=np.float64))
    first = submit(client, query_body(*registered), **{"Idempotency-Key": "repeat-1"})
    retried = submit(client, query_body(*registered), **{"Idempotency-Key": "repeat-1"})
    assert first["cached"] is True and retried == first
    assert_error(client.post("/v1/queries", json=query_body(*registered, top_k=2), headers={"Idempotency-Key": "repeat-1"}),
                 409, "idempotency_key_reused")


def test_repeat_post_and_get_send_few_statements(
    client: TestClient, settings: Settings, registered: tuple[str, str], statements: list[str]
) -> None:
    finish(settings, submit(client, query_body(*registered))["id"], np.arange(NUM_ROWS, dtype=np.float64))
    submit(client, query_body(*registered))  # warm: the params are parsed once per process
    statements.clear()
    cached = submit(client, query_body(*registered))
    # model + dataset, the succeeded query, the new row, its ranked rows (RETURNING): no read-back
    assert statements == ["SELECT", "SELECT", "INSERT", "INSERT"], statements
    statements.clear()
    client.get(f"/v1/queries/{cached['id']}")
    assert statements == ["SELECT", "SELECT"], statements  # the query, its ranked rows (not its parts)


def test_missing_model_or_dataset_is_named(
    client: TestClient, other_client: TestClient, registered: tuple[str, str], data_files: Any
) -> None:
    model_id, dataset_id = registered
    assert_error(client.post("/v1/queries", json=query_body("0" * 32, dataset_id)), 404, "model_not_found")
    assert_error(client.post("/v1/queries", json=query_body(model_id, "f" * 32)), 404, "dataset_not_found")
    assert_error(client.post("/v1/queries", json=query_body("0" * 32, "f" * 32)), 404, "model_not_found")
    own_model = register_model(other_client, data_files)["id"]  # tenant B's model, tenant A's dataset
    assert_error(other_client.post("/v1/queries", json=query_body(own_model, dataset_id)), 404, "dataset_not_found")
    own_dataset = register_dataset(other_client, data_files)["id"]
    assert submit(other_client, query_body(own_model, own_dataset))["cached"] is False


def test_params_are_parsed_once_per_request(
    client: TestClient, registered: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[Any] = []
    real = query_validation.parse_params

    def counting(method: str, raw: Any) -> Any:
        parsed.append(raw)
        return real(method, raw)

    monkeypatch.setattr(query_validation, "parse_params", counting)
    first = submit(client, query_body(*registered, params={"steps": 3, "lr": 0.05}))
    again = submit(client, query_body(*registered, params={"lr": 0.05, "steps": 3}))  # same object, keys reordered
    assert len(parsed) == 2 and again["params"] == first["params"]
    for _ in range(2):  # a refused object is refused every time
        assert_error(client.post("/v1/queries", json=query_body(*registered, params={"steps": "many"})),
                     422, "invalid_params")
    assert len(parsed) == 4


def test_latest_succeeded_lookup_reads_the_index_in_order(settings: Settings) -> None:
    """Every cached answer is another succeeded row with the same hash; the lookup of the
    latest must come from the index in order (no sort of all of them), whatever the table size."""
    with session_scope(settings) as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_sort = off"))  # only penalised: a sort still shows if needed
        plan = "\n".join(session.scalars(text(
            "EXPLAIN SELECT id FROM queries WHERE tenant = 't' AND request_hash = 'h' AND status = 'succeeded' "
            "ORDER BY finished_at DESC LIMIT 1")))
    assert "ix_queries_request_hash_status" in plan and "Sort" not in plan, plan
