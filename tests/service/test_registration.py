"""Models and datasets over HTTP on the real Postgres: register, read, list, delete, tenants, auth."""

from __future__ import annotations

import hashlib

import pytest
import torch
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.service.conftest import (
    SHARD_SIZES,
    DataFiles,
    Tenants,
    assert_error,
    make_client,
    register_dataset,
    register_model,
)

pytestmark = pytest.mark.integration


def test_register_model_loads_it_and_records_hash_and_size(client: TestClient, data_files: DataFiles) -> None:
    response = client.post("/v1/models", json={"name": "digits-mlp", "uri": data_files.model.as_uri(),
                                               "format": "auto", "task": "classification"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/models/{body['id']}"
    assert body["name"] == "digits-mlp" and body["task"] == "classification"
    assert body["format"] == "torchscript"  # "auto" resolved by sniffing
    assert body["sha256"] == hashlib.sha256(data_files.model.read_bytes()).hexdigest()
    expected_params = sum(p.numel() for p in torch.jit.load(str(data_files.model)).parameters())
    assert body["num_parameters"] == expected_params == 4 * 8 + 8 + 8 * 3 + 3
    assert body["created_at"].endswith(("Z", "+00:00"))
    assert client.get(f"/v1/models/{body['id']}").json() == body


def test_register_dataset_computes_offsets_counts_and_hash(client: TestClient, data_files: DataFiles) -> None:
    body = register_dataset(client, data_files)
    assert body["num_samples"] == sum(SHARD_SIZES)
    assert [s["num_samples"] for s in body["shards"]] == list(SHARD_SIZES)
    assert [s["row_offset"] for s in body["shards"]] == [0, SHARD_SIZES[0]]
    shard_hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in data_files.shards]
    assert [s["sha256"] for s in body["shards"]] == shard_hashes
    assert [s["uri"] for s in body["shards"]] == [p.as_uri() for p in data_files.shards]
    from loading import dataset_sha256

    assert body["sha256"] == dataset_sha256(shard_hashes)
    reordered = client.post("/v1/datasets", json={"name": "r", "shards": [{"uri": p.as_uri()} for p in data_files.shards[::-1]]})
    assert reordered.json()["sha256"] != body["sha256"]  # order matters: global indices differ
    assert client.get(f"/v1/datasets/{body['id']}").json() == body


def test_lists_are_paginated_newest_first(client: TestClient, data_files: DataFiles) -> None:
    ids = [register_model(client, data_files, name=f"m{i}")["id"] for i in range(5)]
    first = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in first["items"]] == ids[::-1][:2]
    assert (first["limit"], first["offset"], first["next_offset"]) == (2, 0, 2)
    seen = [m["id"] for m in first["items"]]
    offset = first["next_offset"]
    while offset is not None:
        page = client.get("/v1/models", params={"limit": 2, "offset": offset}).json()
        seen += [m["id"] for m in page["items"]]
        offset = page["next_offset"]
    assert seen == ids[::-1]
    assert_error(client.get("/v1/models", params={"limit": 501}), 422, "invalid_input", "limit")
    assert_error(client.get("/v1/datasets", params={"offset": -1}), 422, "invalid_input", "offset")


def test_delete_is_soft_and_hides_the_row(client: TestClient, data_files: DataFiles) -> None:
    model = register_model(client, data_files)
    dataset = register_dataset(client, data_files)
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert_error(client.get(f"/v1/models/{model['id']}"), 404, "model_not_found")
    assert_error(client.get(f"/v1/datasets/{dataset['id']}"), 404, "dataset_not_found")
    assert_error(client.delete(f"/v1/models/{model['id']}"), 404)
    assert client.get("/v1/models").json()["items"] == []
    assert client.get("/v1/datasets").json()["items"] == []


def test_tenants_never_see_each_other(client: TestClient, other_client: TestClient, data_files: DataFiles) -> None:
    model = register_model(client, data_files)
    dataset = register_dataset(client, data_files)
    unknown = "0" * 32
    for path in (f"/v1/models/{model['id']}", f"/v1/datasets/{dataset['id']}"):
        foreign = other_client.get(path)
        missing = other_client.get(path.rsplit("/", 1)[0] + "/" + unknown)
        assert_error(foreign, 404)
        assert foreign.json()["error"] == missing.json()["error"]
        assert foreign.json()["detail"].replace(path.rsplit("/", 1)[1], unknown) == missing.json()["detail"]
        assert_error(other_client.delete(path), 404)
    assert other_client.get("/v1/models").json()["items"] == []
    assert other_client.get("/v1/datasets").json()["items"] == []
    assert client.get(f"/v1/models/{model['id']}").status_code == 200  # B's delete did nothing


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer "])
def test_missing_or_unknown_key_is_401(settings: Settings, header: str | None) -> None:
    with make_client(settings, None) as http:
        headers = {"Authorization": header} if header else {}
        response = http.get("/v1/models", headers=headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert http.get("/healthz").status_code == 200  # operations endpoints need no key


def test_auth_off_uses_the_default_tenant(settings: Settings, data_files: DataFiles) -> None:
    anonymous = settings.model_copy(update={"api_keys": None})
    with make_client(anonymous, None) as http:
        model = register_model(http, data_files)
        assert http.get(f"/v1/models/{model['id']}").status_code == 200


@pytest.mark.parametrize(("uri", "code", "mentions"), [
    ("outside", "invalid_uri", "outside"),
    ("hidden", "invalid_uri", "private"),
    ("missing", "invalid_uri", "no such file"),
    ("dotdot", "invalid_uri", "outside"),
    ("http://example.com/model.pt", "invalid_uri", "scheme"),
    ("/etc/passwd", "invalid_uri", "scheme"),
    ("broken", "invalid_model", None),
])
def test_model_uri_problems_are_422(client: TestClient, data_files: DataFiles, uri: str, code: str, mentions: str | None) -> None:
    uris = {
        "outside": data_files.outside_shard.as_uri(), "hidden": data_files.hidden_shard.as_uri(),
        "missing": (data_files.root / "models" / "nope.pt").as_uri(),
        "dotdot": f"file://{data_files.root}/../{data_files.outside_shard.parent.name}/outside.npz",
        "broken": data_files.broken_model.as_uri(),
    }
    response = client.post("/v1/models", json={"name": "m", "uri": uris.get(uri, uri), "format": "torchscript",
                                               "task": "classification"})
    body = assert_error(response, 422, code, mentions)
    assert body["detail"].startswith("uri: ")


@pytest.mark.parametrize(("which", "code", "field"), [
    ("outside", "invalid_uri", "shards[1].uri"),
    ("hidden", "invalid_uri", "shards[1].uri"),
    ("model_as_shard", "invalid_shard", "shards[1]"),
])
def test_dataset_shard_problems_name_the_shard(client: TestClient, data_files: DataFiles, which: str, code: str, field: str) -> None:
    bad = {"outside": data_files.outside_shard, "hidden": data_files.hidden_shard, "model_as_shard": data_files.model}[which]
    response = client.post("/v1/datasets", json={"name": "d", "shards": [{"uri": data_files.shards[0].as_uri()},
                                                                         {"uri": bad.as_uri()}]})
    body = assert_error(response, 422, code, field)
    assert body["detail"].startswith(field)
    assert client.get("/v1/datasets").json()["items"] == []  # nothing half-registered


def test_unknown_ids_and_malformed_ids_are_404(client: TestClient, tenants: Tenants) -> None:
    for path in ("/v1/models/abc", "/v1/datasets/" + "f" * 32, "/v1/queries/%00", "/v1/queries/" + "x" * 300):
        assert_error(client.get(path), 404)
