"""`python -m service [--host 127.0.0.1] [--port 8000] [--processes N]`: serve the REST API with uvicorn.

Idle keep-alive connections stay open `KEEP_ALIVE_TIMEOUT_S` seconds (default 75; uvicorn's
own default is 5 s, see `server_config`).

Refuses to start with auth off (no `API_KEYS`) on a non-loopback address, and with more
than one process (`--processes`, default `API_PROCESSES`, else 1) in embedded mode. In
embedded mode (no `DATABASE_URL`) the SQLite file under the data root is migrated to the
latest schema first; with Postgres, run `alembic upgrade head` (the `migrate` step) before
starting.

N > 1 processes: uvicorn's supervisor binds the socket and runs N worker processes, each
building its app from the environment (`create_app()`), restarting any that dies, and
stopping them all on SIGTERM or SIGINT (settings from which no app can be built fail before
any is started, as with one process). Their request metrics are summed through a private
`PROMETHEUS_MULTIPROC_DIR` (`service.api.metrics`), created for this server and removed when
it stops. Exit code 3 (uvicorn's start-up failure) if a worker process could not start.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import logging
import os
import socket
import sys
import tempfile
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.api.app import create_app
from service.api.metrics import MULTIPROCESS_DIR_ENV
from service.db.migrate import upgrade_head
from service.settings import Settings, get_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
APP_FACTORY = "service.api.app:create_app"

log = logging.getLogger("service")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_problem(settings: Settings, host: str) -> str | None:
    """Why the server must not start with these settings on `host`, or None."""
    try:
        keys = settings.tenants_by_key
    except ValueError as exc:
        return f"invalid API_KEYS: {exc}"
    if not keys and not is_loopback(host):
        return (f"refusing to serve on {host} with authentication off: set API_KEYS=key1:tenant1,... "
                "or bind to a loopback address such as 127.0.0.1")
    if settings.api_processes > 1 and (not settings.database_url or settings.embedded):
        return (f"refusing to run {settings.api_processes} API processes in embedded mode: several processes "
                "need DATABASE_URL and REDIS_URL (SQLite and the in-process worker serve from one process); "
                "use --processes 1 or API_PROCESSES=1")
    return None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the attribution REST API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--processes", type=positive_int, default=None,
                        help="API processes (default: API_PROCESSES, else 1); > 1 needs DATABASE_URL and REDIS_URL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)

    settings = get_settings()
    if args.processes is not None:
        settings = settings.model_copy(update={"api_processes": args.processes})
    problem = startup_problem(settings, args.host)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if settings.database_url is None:
        upgrade_head(settings)
    app = create_app(settings)  # N > 1: settings no app can be built from fail here, not in a restart loop
    if settings.api_processes > 1:
        return serve_processes(settings, args.host, args.port, args.log_level)
    uvicorn.Server(server_config(app, settings, host=args.host, port=args.port, log_level=args.log_level)).run()
    return 0


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's config for `app` (an app, or an import path with `factory=True`) with the
    service's keep-alive: an idle keep-alive connection stays open `KEEP_ALIVE_TIMEOUT_S`
    (default 75 s, longer than common client pools keep idle connections), not uvicorn's 5 s,
    after which a client sending its next request on the connection as the server closes it
    gets no response at all."""
    return uvicorn.Config(app, timeout_keep_alive=settings.keep_alive_timeout_s, **options)


def serve_processes(settings: Settings, host: str, port: int, log_level: str) -> int:
    """Run `settings.api_processes` uvicorn worker processes of `create_app()` until SIGTERM/SIGINT,
    their request metrics summed in a private directory that is removed afterwards; the exit code."""
    processes = settings.api_processes
    with tempfile.TemporaryDirectory(prefix="attribution-metrics-") as metrics_dir:
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir  # inherited by the worker processes uvicorn spawns
        try:
            config = server_config(APP_FACTORY, settings, factory=True, workers=processes, host=host, port=port,
                                   log_level=log_level, log_config=worker_log_config(log_level))
            log.info("serving with %d processes; request metrics summed over them in %s", processes, metrics_dir)
            supervisor = Multiprocess(config, sockets=[tcp_listener(config)])
            supervisor.run()
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]
    failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    return STARTUP_FAILURE if failed else 0


def tcp_listener(config: uvicorn.Config) -> socket.socket:
    """`config.bind_socket()` marked as TCP. uvicorn leaves its `proto` 0 (encode/uvicorn#3149), so
    asyncio never sets TCP_NODELAY on the connections the workers accept, and every keep-alive
    response after the first waits ~40 ms for the client's delayed ACK (Nagle)."""
    bound = config.bind_socket()
    return socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())


def worker_log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging config plus the root handler `logging.basicConfig` gives the single
    process, so the service's own loggers log alike in every worker process."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["service"] = {"format": LOG_FORMAT}
    config["handlers"]["service"] = {"class": "logging.StreamHandler", "formatter": "service",
                                     "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["service"], "level": log_level.upper()}
    return config


if __name__ == "__main__":
    sys.exit(main())
