"""The bundled digits demo (`examples/digits_demo.py build`) served by the real `python -m service`.

`build_demo` trains it once; `demo_service` serves a copy of it. `DemoService`: the data root
(model, two shards, `queries.json` with the five leaked test points and the row index of each
one's planted copy) and a running embedded service on it, with auth on (`API_KEYS`) unless
`auth=False`. Used by the client, CLI and result-page tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.testing import REPO_ROOT, ServiceProcesses, child_env

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


def build_demo(root: Path) -> Path:
    """`root/example`: the demo's model, shards and `queries.json`, built as the README does
    (`python examples/digits_demo.py build ROOT`; trains in seconds)."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "digits_demo.py"), "build", str(root)],
                          env=child_env({}), capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the demo failed:\n{done.stderr[-2000:]}")
    return root / "example"


@contextmanager
def demo_service(built: Path, root: Path, *, auth: bool = True) -> Iterator[DemoService]:
    """Serve a copy of the built demo `built` (an `example` folder) from the fresh data root
    `root` (embedded: its own SQLite database, in-process worker)."""
    example = Path(shutil.copytree(built, root / "example"))
    env = {"DATA_ROOT": str(root)} | ({"API_KEYS": f"{API_KEY}:demo"} if auth else {})
    with ServiceProcesses(env) as running:
        yield DemoService(url=running.url, api_key=API_KEY if auth else None, example=example,
                          queries=json.loads((example / "queries.json").read_text()))
