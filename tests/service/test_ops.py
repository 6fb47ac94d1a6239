"""Operations endpoints, embedded (SQLite) mode and the `python -m service` entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.__main__ import main, startup_problem
from service.db.migrate import upgrade_head
from service.settings import Settings
from service.testing import ServiceProcesses
from tests.service.conftest import (
    SHARD_SIZES,
    DataFiles,
    Tenants,
    assert_error,
    make_client,
    register_dataset,
    register_model,
)


@pytest.mark.integration
def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "queue": "ok"}}


@pytest.mark.integration
def test_readyz_names_the_queue_when_redis_is_down(settings: Settings, tenants: Tenants) -> None:
    with make_client(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}), tenants.key_a) as http:
        response = http.get("/readyz")
        assert_error(response, 503, "not_ready", "queue")
        assert response.json()["checks"] == {"database": "ok", "queue": "unreachable"}
        assert http.get("/healthz").status_code == 200
        assert "attribution_queue_depth" not in http.get("/metrics").text  # left out, not a failed scrape


@pytest.mark.integration
def test_metrics_exposes_requests_queue_jobs_and_caches(client: TestClient, data_files: DataFiles) -> None:
    register_model(client, data_files)
    client.get("/v1/models/" + "0" * 32)
    text = client.get("/metrics").text
    for name in ("attribution_http_requests_total", "attribution_http_request_duration_seconds_bucket",
                 "attribution_queue_depth", "attribution_jobs", "attribution_job_duration_seconds_bucket",
                 "attribution_result_cache_hits_total", "attribution_result_cache_misses_total",
                 "attribution_cache_hits_total", "attribution_cache_misses_total"):
        assert f"\n{name}" in text, name
    assert 'attribution_http_requests_total{method="POST",route="/v1/models",status="201"} 1.0' in text
    assert 'attribution_http_requests_total{method="GET",route="/v1/models/{model_id}",status="404"} 1.0' in text
    assert 'attribution_jobs{status="queued"}' in text


@pytest.mark.integration
def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/models/{model_id}", "/v1/datasets", "/v1/queries", "/v1/queries/{query_id}",
                 "/v1/queries/{query_id}/scores", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    assert client.get("/docs").headers["content-type"].startswith("text/html")


def _embedded_root(tmp_path: Path, files: DataFiles) -> Path:
    root = tmp_path / "root"
    shutil.copytree(files.root, root, ignore=shutil.ignore_patterns(".service"))
    return root


def test_embedded_mode_on_sqlite(tmp_path: Path, data_files: DataFiles) -> None:
    root = _embedded_root(tmp_path, data_files)
    settings = Settings(data_root=root, api_keys="k1:one,k2:two")
    upgrade_head(settings)
    local = DataFiles(root, root / "models" / "mlp.pt", root / "models" / "broken.pt",
                      tuple(root / p.name for p in data_files.shards), root / ".service" / "hidden.npz",
                      data_files.outside_shard)
    with make_client(settings, "k1") as one, make_client(settings, "k2") as two:
        model = register_model(one, local)
        dataset = register_dataset(one, local)
        assert dataset["num_samples"] == sum(SHARD_SIZES)
        assert one.get(f"/v1/models/{model['id']}").json() == model
        assert_error(two.get(f"/v1/models/{model['id']}"), 404)
        assert_error(one.post("/v1/models", json={"name": "m", "uri": data_files.model.as_uri(),
                                                  "task": "classification"}), 422, "invalid_uri")
        assert one.get("/v1/queries").json() == {"items": [], "limit": 50, "offset": 0, "next_offset": None}
        assert one.get("/readyz").json()["checks"] == {"database": "ok", "queue": "ok"}
        assert one.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert (root / ".service" / "attribution.db").is_file()


@pytest.mark.parametrize(("host", "api_keys", "refused"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("0.0.0.0", "k:t", False), ("127.0.0.1", "broken", True),
])
def test_start_up_refuses_auth_off_on_public_addresses(tmp_path: Path, host: str, api_keys: str | None, refused: bool) -> None:
    problem = startup_problem(Settings(data_root=tmp_path, api_keys=api_keys), host)
    assert (problem is not None) == refused


def test_main_exits_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from service.settings import get_settings

    monkeypatch.delenv("API_KEYS", raising=False)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert main(["--host", "0.0.0.0", "--port", "1"]) == 2
    finally:
        get_settings.cache_clear()
    assert "authentication off" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_service_migrates_the_embedded_database_and_serves(tmp_path: Path, data_files: DataFiles) -> None:
    root = _embedded_root(tmp_path, data_files)
    with ServiceProcesses({"DATA_ROOT": str(root)}, log_dir=tmp_path / "logs", log_level="warning") as running:
        response = running.client.post("/v1/models", json={
            "name": "m", "uri": (root / "models" / "mlp.pt").as_uri(), "format": "torchscript",
            "task": "classification"})
        assert response.status_code == 201, response.text
        assert running.client.get("/v1/models").json()["items"][0]["id"] == response.json()["id"]
