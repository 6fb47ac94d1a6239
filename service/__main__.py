"""`python -m service [--host 127.0.0.1] [--port 8000]`: serve the REST API with uvicorn.

Refuses to start with auth off (no `API_KEYS`) on a non-loopback address. In embedded mode
(no `DATABASE_URL`) the SQLite file under the data root is migrated to the latest schema
first; with Postgres, run `alembic upgrade head` (the `migrate` step) before starting.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

import uvicorn

from service.api.app import create_app
from service.db.migrate import upgrade_head
from service.settings import Settings, get_settings


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
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the attribution REST API.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = get_settings()
    problem = startup_problem(settings, args.host)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if settings.database_url is None:
        upgrade_head(settings)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
