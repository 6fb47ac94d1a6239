"""`python -m service --processes N` (or `API_PROCESSES`): refused in embedded mode; on Postgres +
Redis, N uvicorn worker processes whose `/metrics` report the request counts and latencies
summed over all of them, all stopped by one SIGTERM, which also removes their metrics directory.
The listener they share gives accepted connections TCP_NODELAY (uvicorn's own does not)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.multiprocess import MultiProcessCollector

from service.__main__ import APP_FACTORY, main, startup_problem, tcp_listener
from service.settings import Settings, get_settings
from service.testing import REPO_ROOT, ServiceProcesses, child_env, free_port

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/unused"
REDIS = "redis://127.0.0.1:6379/0"
ROUND = 40  # requests per round, each on a new connection, 8 at a time
MAX_ROUNDS = 25


@pytest.mark.parametrize(("database_url", "redis_url", "processes", "refused"), [
    (None, None, 2, True), (POSTGRES, None, 2, True), (None, REDIS, 2, True), (POSTGRES, REDIS, 2, False),
    (None, None, 1, False),
])
def test_several_processes_need_postgres_and_redis(tmp_path: Path, database_url: str | None, redis_url: str | None,
                                                   processes: int, refused: bool) -> None:
    settings = Settings(data_root=tmp_path, database_url=database_url, redis_url=redis_url, api_processes=processes)
    problem = startup_problem(settings, "127.0.0.1")
    assert (problem is not None) == refused
    if refused:
        assert "embedded mode" in str(problem)


@pytest.mark.parametrize(("argv", "environment", "named"), [
    (["--processes", "2"], {}, "2 API processes"),
    ([], {"API_PROCESSES": "3"}, "3 API processes"),
    (["--processes", "4"], {"API_PROCESSES": "1", "DATABASE_URL": POSTGRES}, "4 API processes"),
])
def test_main_refuses_several_processes_in_embedded_mode(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        argv: list[str], environment: dict[str, str], named: str) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "API_KEYS", "API_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main([*argv, "--port", "1"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err and "DATABASE_URL and REDIS_URL" in err
    assert not (tmp_path / ".service").exists()  # refused before migrating anything


def test_processes_must_be_positive() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--processes", "0"])
    assert exited.value.code == 2


def test_settings_no_app_can_be_built_from_fail_before_any_process_starts(tmp_path: Path) -> None:
    env = child_env({"DATA_ROOT": str(tmp_path), "DATABASE_URL": "postgresql+nosuchdriver://u@127.0.0.1/db",
                     "REDIS_URL": REDIS})
    done = subprocess.run([sys.executable, "-m", "service", "--processes", "2", "--port", str(free_port())],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "NoSuchModuleError" in done.stderr and "Started parent process" not in done.stderr


def test_the_shared_listener_gives_accepted_connections_tcp_nodelay() -> None:
    listener = tcp_listener(uvicorn.Config(APP_FACTORY, host="127.0.0.1", port=0, log_config=None))

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname())
            value = await accepted
            writer.close()
        return value

    assert listener.proto == socket.IPPROTO_TCP
    assert asyncio.run(accepted_nodelay()) != 0


def _metrics_dir(service_log: Path) -> Path:
    found = re.search(r"request metrics summed over them in (\S+)", service_log.read_text())
    assert found, service_log.read_text()[-2000:]
    return Path(found.group(1))


def _healthz_by_process(metrics_dir: Path) -> dict[int, float]:
    """`{pid: GET /healthz requests it served}`, read from each process's own counter file."""
    served = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        served[pid] = sum(sample.value for metric in MultiProcessCollector.merge([str(path)])
                          for sample in metric.samples
                          if sample.name == "attribution_http_requests_total" and sample.labels["route"] == "/healthz")
    return served


def _sample(text: str, series: str) -> float:
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(series + " ")]
    assert len(values) == 1, (series, values)
    return values[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_report_summed_metrics_and_stop_on_sigterm(tmp_path: Path, postgres_url: str,
                                                                 redis_url: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    env = {"DATA_ROOT": str(root), "DATABASE_URL": postgres_url, "REDIS_URL": redis_url}
    made, served = 0, {}
    with ServiceProcesses(env, processes=2, log_dir=tmp_path / "logs", log_level="info") as running:
        supervisor = running.service
        assert supervisor is not None
        metrics_dir = _metrics_dir(tmp_path / "logs" / "service.log")

        def healthz(_: int) -> int:
            return httpx.get(f"{running.url}/healthz").status_code  # a new connection: either process may accept

        # Rounds until both processes served some (the second may finish starting after /readyz answered).
        with ThreadPoolExecutor(8) as pool:
            for _ in range(MAX_ROUNDS):
                assert list(pool.map(healthz, range(ROUND))) == [200] * ROUND
                made += ROUND
                served = _healthz_by_process(metrics_dir)
                if len(served) == 2 and min(served.values()) > 0:
                    break
        # A request is counted once its response is sent, so the last ones may land just after
        # the client read their answers: wait (briefly) until every request made is counted.
        deadline = time.monotonic() + 5.0
        while sum(served.values()) < made and time.monotonic() < deadline:
            time.sleep(0.05)
            served = _healthz_by_process(metrics_dir)
        first, second = (running.client.get("/metrics").text for _ in range(2))

    assert len(served) == 2 and min(served.values()) > 0, served
    assert supervisor.pid not in served
    assert sum(served.values()) == made
    for text in (first, second):  # whichever process answers reports the totals
        assert _sample(text, 'attribution_http_requests_total{method="GET",route="/healthz",status="200"}') == made
        assert _sample(text, 'attribution_http_request_duration_seconds_count{method="GET",route="/healthz"}') == made
        assert _sample(text, "attribution_result_cache_misses_total") == 0
        assert text.count("# TYPE attribution_queue_depth gauge") == 1  # scrape-time state: once
        assert text.count("# TYPE attribution_http_requests_total counter") == 1  # one family, summed
    assert _sample(second, 'attribution_http_requests_total{method="GET",route="/metrics",status="200"}') == 1

    assert supervisor.returncode == 0
    assert not any(_alive(pid) for pid in served)
    assert not metrics_dir.exists()
