"""Run the real service and workers as subprocesses, for tests, benchmarks and demos.

`ServiceProcesses(env, workers=k, processes=n)` starts `python -m service --processes n` on a
free loopback port and k × `python -m workers`, configured only through the environment,
exactly as an operator runs the product: the children get this process's environment without
its service settings (`DATABASE_URL`, `REDIS_URL`, `API_KEYS`, `DATA_ROOT`), plus `env`, with
the repository on `PYTHONPATH`. `with ServiceProcesses(...) as running:` returns once
`/readyz` answers 200 (database and queue reachable); `running.url` / `running.client` reach
the API. Workers can be stopped and added between rounds (`stop_workers`, `add_workers`,
`wait_workers` until they listen on RQ). On exit it stops exactly the processes it started
(SIGTERM to all, then SIGKILL after a grace period). Each process logs to
`<log_dir>/<name>.log`. `wait_final` polls queries until they reach a final status.

Used by the end-to-end tests and the speed studies; nothing the service or the workers run
imports it (and `attribution/` never does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE_SETTINGS = ("DATABASE_URL", "REDIS_URL", "API_KEYS", "DATA_ROOT")
FINAL_STATUSES = ("succeeded", "failed", "canceled")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its service settings, plus `extra`, repo on `PYTHONPATH`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def wait_final(client: httpx.Client, query_ids: Sequence[str], timeout: float = 180.0,
               interval: float = 0.1) -> dict[str, dict[str, Any]]:
    """Poll `GET /v1/queries/{id}` until every query is final; `{id: body}`. TimeoutError past `timeout`."""
    pending, done = list(query_ids), {}
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} queries not final after {timeout:.0f} s")
        still = []
        for query_id in pending:
            body = client.get(f"/v1/queries/{query_id}").json()
            if body["status"] in FINAL_STATUSES:
                done[query_id] = body
            else:
                still.append(query_id)
        pending = still
        if pending:
            time.sleep(interval)
    return done


class ServiceProcesses:
    """`python -m service` + `workers` × `python -m workers` as subprocesses on 127.0.0.1.

    `env`: the service settings (`DATA_ROOT`, and `DATABASE_URL` + `REDIS_URL` for a
    deployment with separate workers; embedded mode needs only `DATA_ROOT`). `log_dir`
    defaults to `<DATA_ROOT>/logs`. `worker_threads` sets `OMP_NUM_THREADS` /
    `MKL_NUM_THREADS` of the workers (one intra-op thread each: k workers use k cores).
    `processes`: API processes (`--processes`; > 1 needs `DATABASE_URL` and `REDIS_URL`);
    SIGTERM to the API stops all of them.
    """

    def __init__(self, env: Mapping[str, str], *, workers: int = 0, processes: int = 1, log_dir: Path | None = None,
                 log_level: str = "info", worker_threads: int | None = None, ready_timeout: float = 90.0) -> None:
        self.env = child_env(env)
        self.initial_workers = workers
        self.processes = processes
        self.log_dir = log_dir or Path(env["DATA_ROOT"]) / "logs"
        self.log_level = log_level
        self.worker_threads = worker_threads
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        self.service: subprocess.Popen[bytes] | None = None
        self.worker_processes: list[subprocess.Popen[bytes]] = []
        self.worker_names: list[str] = []
        self._started_workers = 0

    def __enter__(self) -> Self:
        try:
            self.service = self._spawn("service", [sys.executable, "-m", "service", "--host", "127.0.0.1",
                                                   "--port", str(self.port), "--log-level", self.log_level,
                                                   "--processes", str(self.processes)])
            self.add_workers(self.initial_workers)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def add_workers(self, count: int, env_overrides: Mapping[str, str] | None = None) -> None:
        """Start `count` more `python -m workers` (named `worker-<port>-<n>`), with `env_overrides`."""
        env = {**self.env, **(env_overrides or {})}
        if self.worker_threads is not None:
            env.update(OMP_NUM_THREADS=str(self.worker_threads), MKL_NUM_THREADS=str(self.worker_threads))
        for _ in range(count):
            name = f"worker-{self.port}-{self._started_workers}"
            self._started_workers += 1
            argv = [sys.executable, "-m", "workers", "--name", name, "--log-level", self.log_level.upper()]
            self.worker_processes.append(self._spawn(name, argv, env))
            self.worker_names.append(name)

    def wait_workers(self, timeout: float = 120.0) -> None:
        """Block until every running worker has registered with RQ (imports done, listening)."""
        from redis import Redis
        from rq import Worker

        connection = Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + timeout
        try:
            while not set(self.worker_names) <= {w.name for w in Worker.all(connection=connection)}:
                exited = [n for n, p in zip(self.worker_names, self.worker_processes, strict=True) if p.poll() is not None]
                if exited:
                    raise RuntimeError(f"worker {exited[0]} exited early; see {self.log_dir / exited[0]}.log")
                if time.monotonic() > deadline:
                    raise TimeoutError("workers did not register with RQ in time")
                time.sleep(0.2)
        finally:
            connection.close()

    def stop_workers(self) -> None:
        """Stop every worker started so far (each finishes its current job first)."""
        _terminate_all(self.worker_processes)
        self.worker_processes, self.worker_names = [], []

    def stop(self) -> None:
        """Stop the workers and the API (only the processes this object started)."""
        self.client.close()
        _terminate_all([*self.worker_processes, *([self.service] if self.service else [])])
        self.service, self.worker_processes, self.worker_names = None, [], []

    def wait_final(self, query_ids: Sequence[str], timeout: float = 180.0,
                   interval: float = 0.1) -> dict[str, dict[str, Any]]:
        """`wait_final` on this deployment's API."""
        return wait_final(self.client, query_ids, timeout, interval)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(argv, cwd=REPO_ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        log = self.log_dir / "service.log"
        while time.monotonic() < deadline:
            if self.service is None or self.service.poll() is not None:
                raise RuntimeError(f"the API exited early:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the API did not become ready:\n{log.read_text()[-3000:]}")


def _terminate_all(processes: Sequence[subprocess.Popen[bytes]], grace: float = 15.0) -> None:
    """SIGTERM to every process at once (RQ's warm shutdown: the current job finishes), then
    wait for each; SIGKILL whichever is still running after `grace` seconds."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
