"""Malformed requests of every kind get a 4xx JSON error naming the field; never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.conftest import NUM_FEATURES, Tenants, assert_error, make_client, query_body

Body = Callable[[str, str], dict[str, Any]]

pytestmark = pytest.mark.integration


def _with(**changes: Any) -> Body:
    return lambda model_id, dataset_id: {**query_body(model_id, dataset_id), **changes}


ROW = [0.1, 0.2, 0.3, 0.4]

MALFORMED_QUERIES: list[tuple[str, Body, int, str, str]] = [
    ("negative top_k", _with(top_k=-1), 422, "invalid_input", "top_k"),
    ("zero top_k", _with(top_k=0), 422, "invalid_input", "top_k"),
    ("huge top_k", _with(top_k=10**12), 422, "invalid_input", "top_k"),
    ("top_k as text", _with(top_k="ten"), 422, "invalid_input", "top_k"),
    ("top_k as float", _with(top_k=2.5), 422, "invalid_input", "top_k"),
    ("unknown field", _with(topk=3), 422, "invalid_input", "topk: unknown field"),
    ("empty method", _with(method=""), 422, "invalid_input", "method"),  # omitted: "auto" (test_auto_queries)
    ("unknown method", _with(method="magic"), 422, "unknown_method", "forward_inf"),
    ("unknown param", _with(params={"bogus": 1}), 422, "invalid_params", "params.bogus"),
    ("param of wrong type", _with(params={"steps": "two"}), 422, "invalid_params", "params.steps"),
    ("params not an object", _with(params=[1, 2]), 422, "invalid_input", "params"),
    ("bad mode", _with(mode="both"), 422, "invalid_input", "mode"),
    ("no samples", _with(samples=None), 422, "invalid_samples", "samples"),
    ("samples and self_influence", _with(self_influence=True), 422, "invalid_input", "samples"),
    ("self_influence per_sample", _with(self_influence=True, samples=None, mode="per_sample"), 422, "invalid_input", "mode"),
    ("samples not an object", _with(samples=[ROW]), 422, "invalid_input", "samples"),
    ("unknown samples key", _with(samples={"x": [ROW], "z": [1]}), 422, "invalid_samples", "samples.z"),
    ("empty x", _with(samples={"x": [], "y": []}), 422, "invalid_samples", "samples.x"),
    ("ragged x", _with(samples={"x": [ROW, [0.1, 0.2]], "y": [0, 1]}), 422, "invalid_samples", "samples.x[1]"),
    ("text in x", _with(samples={"x": [[0.1, "a", 0.3, 0.4]], "y": [0]}), 422, "invalid_samples", "samples.x[0][1]"),
    ("bool in x", _with(samples={"x": [[True, 0.2, 0.3, 0.4]], "y": [0]}), 422, "invalid_samples", "samples.x[0]"),
    ("x too deep", _with(samples={"x": [[[[[[[[[[0.0]]]]]]]]]]}), 422, "invalid_samples", "samples.x"),
    ("huge number", _with(samples={"x": [[10**400, 0.2, 0.3, 0.4]], "y": [0]}), 422, "invalid_samples", "samples.x[0][0]"),
    ("y length mismatch", _with(samples={"x": [ROW, ROW], "y": [1]}), 422, "invalid_samples", "samples.y"),
    ("wrong feature count", _with(samples={"x": [[0.1] * (NUM_FEATURES + 1)], "y": [0]}), 422, "invalid_samples", "samples.x"),
    ("label out of range", _with(samples={"x": [ROW], "y": [7]}), 422, "invalid_samples", "samples.y"),
    ("bad ref", _with(samples={"refs": [{"dataset_id": "d", "index": -1}]}), 422, "invalid_samples", "samples.refs[0].index"),
    ("text with NUL", _with(samples={"text": ["a\x00b"]}), 422, "invalid_samples", "samples.text[0]"),
    ("callback not http", _with(callback_url="ftp://example.com/hook"), 422, "invalid_input", "callback_url"),
    ("method with NUL", _with(method="forward\x00inf"), 422, "invalid_input", "method"),
    ("unknown model", _with(model_id="0" * 32), 404, "model_not_found", "model"),
    ("malformed model id", _with(model_id="'; DROP TABLE models; --"), 404, "model_not_found", "model"),
    ("unknown dataset", _with(dataset_id="f" * 32), 404, "dataset_not_found", "dataset"),
]


@pytest.mark.parametrize(("body", "status", "code", "mentions"),
                         [case[1:] for case in MALFORMED_QUERIES], ids=[case[0] for case in MALFORMED_QUERIES])
def test_malformed_query_bodies(client: TestClient, registered: tuple[str, str], body: Body, status: int,
                                code: str, mentions: str) -> None:
    assert_error(client.post("/v1/queries", json=body(*registered)), status, code, mentions)


NON_FINITE = ["NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_numbers_in_samples_are_refused(client: TestClient, registered: tuple[str, str], literal: str) -> None:
    raw = json.dumps(query_body(*registered)).replace("0.05", literal)
    response = client.post("/v1/queries", content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_samples", "samples.x[0][3]")


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_params_are_refused(client: TestClient, registered: tuple[str, str], literal: str) -> None:
    raw = json.dumps(query_body(*registered)).replace('"lr": 0.01', f'"lr": {literal}')
    response = client.post("/v1/queries", content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_params", "params.lr")


RAW_BODIES = [
    ("not json", b"{not json", "application/json", 422),
    ("truncated json", b'{"name": "m", "uri": ', "application/json", 422),
    ("json array", b"[1, 2, 3]", "application/json", 422),
    ("json string", b'"hello"', "application/json", 422),
    ("empty body", b"", "application/json", 422),
    ("plain text", b'{"name": "m"}', "text/plain", 422),
    ("no content type", b'{"name": "m"}', None, 422),
    ("invalid utf-8", b'{"name": "\xff\xfe"}', "application/json", 400),
    ("deeply nested", b"[" * 50_000 + b"]" * 50_000, "application/json", 400),
    ("lone surrogate", b'{"name": "\\ud800", "uri": "file:///x", "task": "classification"}', "application/json", 422),
    ("NUL in name", b'{"name": "a\\u0000b", "uri": "file:///x", "task": "classification"}', "application/json", 422),
]


@pytest.mark.parametrize(("raw", "content_type", "status"), [case[1:] for case in RAW_BODIES],
                         ids=[case[0] for case in RAW_BODIES])
def test_unparseable_bodies(client: TestClient, raw: bytes, content_type: str | None, status: int) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/models", "/v1/datasets", "/v1/queries"):
        assert_error(client.post(path, content=raw, headers=headers), status)


@pytest.mark.parametrize(("path", "body", "mentions"), [
    ("/v1/models", {"name": "m", "uri": "file:///x", "task": "vision"}, "task"),
    ("/v1/models", {"name": "m", "uri": "file:///x", "task": "classification", "format": "onnx"}, "format"),
    ("/v1/models", {"name": "", "uri": "file:///x", "task": "classification"}, "name"),
    ("/v1/models", {"name": "m", "task": "classification"}, "uri"),
    ("/v1/models", {"name": "m", "uri": "file:///x", "task": "classification", "extra": 1}, "extra: unknown field"),
    ("/v1/datasets", {"name": "d", "shards": []}, "shards"),
    ("/v1/datasets", {"name": "d", "shards": [{"url": "file:///x"}]}, "shards[0]"),
    ("/v1/datasets", {"name": "d", "shards": "file:///x"}, "shards"),
])
def test_malformed_registration_bodies(client: TestClient, path: str, body: dict[str, Any], mentions: str) -> None:
    assert_error(client.post(path, json=body), 422, "invalid_input", mentions)


def test_oversized_body_is_413(client: TestClient, settings: Settings) -> None:
    big = b'{"name": "' + b"a" * settings.max_request_bytes + b'"}'
    response = client.post("/v1/models", content=big, headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


def test_oversized_chunked_body_is_413(client: TestClient, settings: Settings) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: transfer-encoding chunked
        yield b'{"name": "'
        for _ in range(settings.max_request_bytes // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    response = client.post("/v1/models", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")


def test_lying_content_length_is_413(client: TestClient, settings: Settings) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(settings.max_request_bytes + 1)}
    response = client.post("/v1/models", content=b"{}", headers=headers)
    assert_error(response, 413, "payload_too_large")


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    assert_error(client.get("/v2/models"), 404, "not_found")
    assert_error(client.put("/v1/models"), 405, "method_not_allowed")
    assert_error(client.get("/v1/queries/" + "0" * 32 + "/scores", params={"format": "npy"}), 404)


def test_database_down_is_503(settings: Settings, tenants: Tenants, data_files: Any) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    with make_client(down, tenants.key_a) as http:
        assert_error(http.get("/v1/models"), 503, "database_unavailable")
        assert_error(http.get("/v1/queries/" + "a" * 32), 503, "database_unavailable")
        response = http.post("/v1/datasets", json={"name": "d", "shards": [{"uri": data_files.shards[0].as_uri()}]})
        assert_error(response, 503, "database_unavailable")
        ready = http.get("/readyz")
        assert_error(ready, 503, "not_ready", "database")
        assert ready.json()["checks"] == {"database": "unreachable", "queue": "ok"}
        assert http.get("/healthz").status_code == 200
        assert "attribution_http_requests_total" in http.get("/metrics").text
