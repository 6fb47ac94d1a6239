from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.demo import DemoService, demo_service


@pytest.fixture(scope="package")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoService]:
    """The demo served with auth on, shared by the client and CLI tests."""
    with demo_service(tmp_path_factory.mktemp("client-demo") / "data") as running:
        yield running
