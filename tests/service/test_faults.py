"""The API under hostile input and database faults (real Postgres and Redis): bounded params,
truthful answers when connections are terminated mid-request, files that must not be opened,
numbers that do not fit, authentication before the body is read."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from attribution.methods.limits import MAXIMUMS
from service.api.app import create_app
from service.db.models import Query
from service.db.session import get_engine, session_scope
from service.settings import Settings
from tests.dbfaults import after_a, starts_with, terminate_backends_when
from tests.service.conftest import DataFiles, Tenants, assert_error, query_body

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


# ----------------------------------------------------------------------------- 1. bounded params
@pytest.mark.parametrize(("method", "params", "field"), [
    ("integrated_influence", {"steps": 1_000_000}, "steps"),
    ("integrated_influence", {"unlearn_steps": 10**6}, "unlearn_steps"),
    ("integrated_influence", {"rank": 5000}, "rank"),
    ("influence", {"ihvp": "lissa", "lissa_depth": 10**7}, "lissa_depth"),
    ("influence", {"ihvp": "lissa", "lissa_repeats": 10**4}, "lissa_repeats"),
    ("influence", {"ihvp": "cg", "cg_max_iter": 10**7}, "cg_max_iter"),
    ("influence", {"ihvp": "arnoldi", "arnoldi_rank": 10**5, "arnoldi_iterations": 10**5}, "arnoldi_rank"),
    ("influence", {"ihvp": "arnoldi", "arnoldi_iterations": 10**5}, "arnoldi_iterations"),
    ("influence", {"ihvp": "exact", "exact_max_params": 10**9}, "exact_max_params"),
    ("influence", {"fit_rows": 10**12}, "fit_rows"),
    ("influence", {"fit_batch_size": 10**7}, "fit_batch_size"),
    ("tracin", {"projection_dim": 10**8}, "projection_dim"),
    ("tracin", {"batch_size": 10**7}, "batch_size"),
    ("tracin", {"checkpoint_model_ids": ["m"] * 65}, "checkpoint_model_ids"),
    ("forward_inf", {"steps": 10**6}, "steps"),
])
def test_cost_scaling_params_beyond_their_maximum_are_422(
    client: TestClient, registered: tuple[str, str], method: str, params: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/queries", json=query_body(*registered, method=method, params=params))
    assert_error(response, 422, "invalid_params", f"params.{field}: must be at most {MAXIMUMS[field]}")


def test_top_k_beyond_its_maximum_is_422(client: TestClient, registered: tuple[str, str], settings: Settings) -> None:
    response = client.post("/v1/queries", json=query_body(*registered, top_k=settings.max_top_k + 1))
    assert_error(response, 422, mentions=f"top_k: must be at most {settings.max_top_k}")


def test_readme_documents_every_maximum() -> None:
    text = README.read_text()
    for field, maximum in MAXIMUMS.items():
        assert re.search(rf"`{field}`[^\n]*\|\s*{maximum:,}".replace(",", "[, ]?"), text), field


# ----------------------------------------------------------------------------- 3. truthful answers
def _queries_of(settings: Settings, tenant: str) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Query).where(Query.tenant == tenant)) or 0)


def test_connection_lost_during_the_commit_says_so_and_a_keyed_retry_makes_one_query(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str]
) -> None:
    body, key = query_body(*registered), {"Idempotency-Key": "blip-1"}
    with terminate_backends_when(get_engine(settings), starts_with("INSERT INTO queries"), moment="after"):
        response = client.post("/v1/queries", json=body, headers=key)  # the commit runs on a dead connection
    detail = assert_error(response, 503, "commit_unknown", "Idempotency-Key")["detail"]
    assert "may or may not have been stored" in detail
    retried = client.post("/v1/queries", json=body, headers=key)
    assert retried.status_code == 202, retried.text
    assert _queries_of(settings, tenants.tenant_a) == 1


def test_connection_lost_after_the_commit_still_answers_with_the_query(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str]
) -> None:
    # The re-read after the commit, and the session's close after it, run on terminated connections.
    fires = after_a("INSERT INTO queries", "SELECT queries")
    with terminate_backends_when(get_engine(settings), fires, moment="after") as fired:
        response = client.post("/v1/queries", json=query_body(*registered))
    assert fired and response.status_code == 202, response.text
    query_id = response.json()["id"]
    assert response.json()["status"] == "queued"
    assert client.get(f"/v1/queries/{query_id}").json()["id"] == query_id
    assert _queries_of(settings, tenants.tenant_a) == 1


def test_connection_lost_before_the_commit_is_503_and_stores_nothing(
    client: TestClient, settings: Settings, tenants: Tenants, registered: tuple[str, str]
) -> None:
    with terminate_backends_when(get_engine(settings), starts_with("INSERT INTO queries")):
        response = client.post("/v1/queries", json=query_body(*registered))
    assert_error(response, 503, "database_unavailable")
    assert _queries_of(settings, tenants.tenant_a) == 0


def test_readyz_reports_a_database_whose_connections_just_failed(
    client: TestClient, settings: Settings, registered: tuple[str, str]
) -> None:
    with terminate_backends_when(get_engine(settings), starts_with("INSERT INTO queries")):
        assert client.post("/v1/queries", json=query_body(*registered)).status_code == 503
    ready = client.get("/readyz")  # a fresh connection answers SELECT 1, but requests just failed
    assert_error(ready, 503, "not_ready", "database failing")
    assert ready.json()["checks"]["database"] == "failing"


# ----------------------------------------------------------------------------- 4. files that must not be opened
def _post_with_deadline(http: TestClient, path: str, body: dict[str, Any], unblock: Path) -> httpx.Response:
    """POST from a thread; if it has not answered within 30 s (it blocks opening the pipe),
    open the pipe's write end so it can finish, and fail."""
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(http.post(path, json=body)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=30)
        pytest.fail(f"POST {path} blocked on the named pipe {unblock.name}")
    return answer[0]


@pytest.fixture()
def fifo(data_files: DataFiles) -> Any:
    path = data_files.root / f"pipe-{os.getpid()}-{threading.get_ident()}.npz"
    os.mkfifo(path)
    yield path
    path.unlink()


def test_a_named_pipe_as_model_is_422_without_opening_it(client: TestClient, fifo: Path) -> None:
    body = {"name": "m", "uri": fifo.as_uri(), "format": "torchscript", "task": "classification"}
    assert_error(_post_with_deadline(client, "/v1/models", body, fifo), 422, "invalid_uri", "named pipe")


def test_a_named_pipe_as_shard_is_422_without_opening_it(client: TestClient, fifo: Path, data_files: DataFiles) -> None:
    body = {"name": "d", "shards": [{"uri": data_files.shards[0].as_uri()}, {"uri": fifo.as_uri()}]}
    assert_error(_post_with_deadline(client, "/v1/datasets", body, fifo), 422, "invalid_uri", "shards[1]")


def test_a_named_pipe_inside_a_model_folder_is_422(client: TestClient, data_files: DataFiles, tmp_path: Path) -> None:
    folder = data_files.root / f"hf-{os.getpid()}-{threading.get_ident()}"
    folder.mkdir()
    pipe = folder / "config.json"
    os.mkfifo(pipe)
    try:
        body = {"name": "m", "uri": folder.as_uri(), "format": "hf", "task": "classification"}
        assert_error(_post_with_deadline(client, "/v1/models", body, pipe), 422, "invalid_uri", "config.json")
    finally:
        pipe.unlink()
        folder.rmdir()


def test_a_socket_file_is_422(client: TestClient, data_files: DataFiles) -> None:
    path = data_files.root / f"sock-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        try:
            response = client.post("/v1/models", json={"name": "m", "uri": path.as_uri(), "format": "torchscript",
                                                       "task": "classification"})
        finally:
            path.unlink()
    assert_error(response, 422, "invalid_uri", "socket")


# ----------------------------------------------------------------------------- 5. numbers that do not fit
@pytest.mark.parametrize(("samples", "field"), [
    ({"x": [[0.1, -0.2, 0.3, 0.05]], "y": [2**63]}, "samples.y[0]"),
    ({"x": [[0.1, -0.2, 0.3, 0.05]], "y": [-(2**63) - 1]}, "samples.y[0]"),
    ({"x": [[0.1, 2**64, 0.3, 0.05]], "y": [1]}, "samples.x[0][1]"),
    ({"x": [[0.1, 1e39, 0.3, 0.05]], "y": [1]}, "samples.x[0][1]"),
])
def test_sample_values_that_do_not_fit_their_tensor_are_422(
    client: TestClient, registered: tuple[str, str], samples: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/queries", json=query_body(*registered, samples=samples))
    assert_error(response, 422, "invalid_samples", field)
    assert client.get("/healthz").status_code == 200  # the connection is still usable


# ----------------------------------------------------------------------------- 6. auth before the body
def _asgi_post(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """POST /v1/models straight to the ASGI app; (status, whether the app read the body)."""
    read = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b'{"name": "m"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"test"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"]), read


@pytest.mark.parametrize("authorization", [None, b"Bearer wrong-key", b"Basic dXNlcjpwYXNz"])
def test_a_request_without_a_valid_key_is_401_before_its_body_is_read(
    settings: Settings, authorization: bytes | None
) -> None:
    headers = [(b"content-length", str(24 * 1024).encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    assert _asgi_post(create_app(settings), headers) == (401, False)


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(settings: Settings, tenants: Tenants) -> None:
    headers = [(b"authorization", f"Bearer {tenants.key_a}".encode()),
               (b"content-length", str(settings.max_request_bytes + 1).encode())]
    assert _asgi_post(create_app(settings), headers) == (413, False)


def test_a_valid_key_reaches_the_route(client: TestClient, data_files: DataFiles) -> None:
    response = client.post("/v1/models", json={"name": "m", "uri": data_files.model.as_uri(),
                                               "format": "torchscript", "task": "classification"})
    assert response.status_code == 201, response.text
    assert client.get(f"/v1/models/{response.json()['id']}").status_code == 200


# ----------------------------------------------------------------------------- 8. keep-alive
IDLE_S = 6.0  # longer than uvicorn's default keep-alive timeout (5 s), far below the service's (75 s)


def _get_healthz(connection: socket.socket) -> bytes:
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b'{"status":"ok"}' not in answer:
        chunk = connection.recv(4096)
        if not chunk:  # the server closed the connection
            break
        answer += chunk
    return answer


@pytest.mark.slow
def test_an_idle_keep_alive_connection_stays_open(tmp_path: Path) -> None:
    from service.testing import ServiceProcesses

    root = tmp_path / "data"
    root.mkdir()
    with ServiceProcesses({"DATA_ROOT": str(root)}, log_dir=tmp_path / "logs", log_level="warning") as running, \
            socket.create_connection(("127.0.0.1", running.port), timeout=30) as connection:
        assert _get_healthz(connection).startswith(b"HTTP/1.1 200")
        threading.Event().wait(IDLE_S)  # idle, like a pooled connection between two requests
        assert _get_healthz(connection).startswith(b"HTTP/1.1 200")
