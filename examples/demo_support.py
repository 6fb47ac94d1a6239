"""Shared by the bundled examples: the `build DATA_ROOT` / `query URL DATA_ROOT` command line,
failing loudly on an error answer, polling a query."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def check(response: httpx.Response) -> dict[str, Any]:
    """The JSON body, or exit with the request and the service's error."""
    if response.status_code >= 400:
        sys.exit(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text}")
    return response.json()  # type: ignore[no-any-return]


def poll(client: httpx.Client, query_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """`GET /v1/queries/{id}` until the query succeeded (exit if it failed or was canceled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = check(client.get(f"/v1/queries/{query_id}"))
        if body["status"] in ("succeeded", "failed", "canceled"):
            if body["status"] != "succeeded":
                sys.exit(f"query {query_id} {body['status']}: {body.get('error')}")
            return body
        time.sleep(0.2)
    sys.exit(f"query {query_id} did not finish in time")


def main(doc: str | None, build: Callable[[Path], Any], query: Callable[[str, Path], Any]) -> None:
    """`build DATA_ROOT` writes the example's files; `query URL DATA_ROOT` asks the running service."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("data_root", type=Path)
    asking = sub.add_parser("query")
    asking.add_argument("url")
    asking.add_argument("data_root", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        build(args.data_root)
    else:
        query(args.url, args.data_root)
