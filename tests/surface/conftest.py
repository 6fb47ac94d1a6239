"""The digits demo, built once per test session, served by `python -m service` for the
client, CLI and result-page tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.surface.demo import DemoService, build_demo, demo_service


@pytest.fixture(scope="session")
def built_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo-build"))


@pytest.fixture(scope="package")
def demo(built_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoService]:
    """The demo served with auth on (`API_KEYS`), shared by the client and CLI tests."""
    with demo_service(built_demo, tmp_path_factory.mktemp("client-demo") / "data") as running:
        yield running
