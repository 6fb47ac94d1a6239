"""Start the product the way users and acceptance scripts do: `python -m service` and
`python -m workers` as subprocesses, configured only through the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "API_KEYS", "DATA_ROOT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@contextmanager
def running_service(env: dict[str, str], workers: int = 0, log_dir: Path | None = None) -> Iterator[str]:
    """Run `python -m service` (+ `workers` × `python -m workers`); yield the base URL."""
    port = free_port()
    full_env = _env(env)
    logs = log_dir or Path(env["DATA_ROOT"])
    procs: list[subprocess.Popen[bytes]] = []
    commands = [[sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]]
    commands += [[sys.executable, "-m", "workers"]] * workers
    names = ["service"] + [f"worker-{i}" for i in range(workers)]
    try:
        for name, command in zip(names, commands, strict=True):
            with open(logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, procs[0], logs / "service.log")
        yield url
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"service did not become healthy:\n{log.read_text()[-3000:]}")


def wait_final(client: httpx.Client, query_id: str, timeout_s: float = 180) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/queries/{query_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise TimeoutError(f"query {query_id} did not finish in {timeout_s} s")
