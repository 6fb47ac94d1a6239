"""The result page in a real browser: headless Chromium (Debian's `chromium`, installed by
`scripts/test.sh`) renders the digits demo's leaked-query page served by `python -m service`;
the planted copy of the leaked test point is the first top row, the thumbnails and histogram
are drawn, and a screenshot is written to `benchmarks/results/ui_query.png`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from attribution_client import Client
from service.testing import REPO_ROOT
from tests.surface.demo import DemoService, demo_service

pytestmark = pytest.mark.slow

SCREENSHOT = REPO_ROOT / "benchmarks" / "results" / "ui_query.png"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/test.sh installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


def browse(url: str, profile: Path, *action: str) -> str:
    """Run headless Chromium on `url` with `action` flags (`--dump-dom`, `--screenshot=...`); its stdout."""
    done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *action, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def open_demo(built_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoService]:
    """The demo served with auth off (a browser sends no Bearer header; loopback only)."""
    with demo_service(built_demo, tmp_path_factory.mktemp("ui-demo") / "data", auth=False) as running:
        yield running


def test_leaked_query_page_shows_the_planted_copy_first(open_demo: DemoService, tmp_path: Path) -> None:
    chromium()
    demo = open_demo
    leaked = demo.queries
    with Client(demo.url) as client:
        model = client.register_model("digits-mlp", demo.uri("mlp.pt"), task="classification")
        dataset = client.register_dataset("digits-train", demo.shard_uris)
        handle = client.query(model, dataset, x=leaked["x"][:1], y=leaked["y"][:1], top_k=10,
                              params={"normalize": "relative"}).wait(timeout=120)

    dom = browse(f"{demo.url}/ui/queries/{handle.id}", tmp_path / "profile", "--dump-dom")
    top = [int(i) for i in re.findall(r'class="ranked top" data-rank="\d+" data-index="(\d+)"', dom)]
    assert top[0] == leaked["copy_index"][0] and len(top) == 10
    assert dom.count('class="thumb"') == 1 + 20  # the query sample, then 10 top and 10 bottom rows
    assert 'class="histogram"' in dom and ">succeeded<" in dom and model.sha256 in dom

    listing = browse(f"{demo.url}/ui/queries", tmp_path / "profile", "--dump-dom")
    assert f'/ui/queries/{handle.id}' in listing

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    browse(f"{demo.url}/ui/queries/{handle.id}", tmp_path / "profile", "--window-size=1280,1300",
           f"--screenshot={SCREENSHOT}")
    assert SCREENSHOT.stat().st_size > 10_000 and SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
