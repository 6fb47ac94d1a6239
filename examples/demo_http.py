"""HTTP helpers shared by the bundled examples: fail loudly on an error answer, poll a query."""

from __future__ import annotations

import sys
import time
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
