"""The bundled digits demo (`examples/digits_demo.py build`) served by the real `python -m service`.

`DemoService`: the demo's data root (model, two shards, `queries.json` with the five leaked
test points and the row index of each one's planted copy) and a running embedded service on
it, with auth on (`API_KEYS`) unless `auth=False`. Used by the client, CLI and UI tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from examples import digits_demo
from service.testing import ServiceProcesses

API_KEY = "demo-key"


@dataclass
class DemoService:
    url: str
    api_key: str | None
    example: Path
    queries: dict[str, Any]

    def uri(self, name: str) -> str:
        return (self.example / name).resolve().as_uri()

    @property
    def shard_uris(self) -> list[str]:
        return [self.uri("train-000.npz"), self.uri("train-001.npz")]


@contextmanager
def demo_service(root: Path, *, auth: bool = True) -> Iterator[DemoService]:
    """Build the demo under `root` and serve it (embedded: SQLite, in-process worker)."""
    example = digits_demo.build(root)
    env = {"DATA_ROOT": str(root)} | ({"API_KEYS": f"{API_KEY}:demo"} if auth else {})
    with ServiceProcesses(env) as running:
        yield DemoService(url=running.url, api_key=API_KEY if auth else None, example=example,
                          queries=json.loads((example / "queries.json").read_text()))
