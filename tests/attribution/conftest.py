"""Session-scoped trained models shared by the core-library tests (see fixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.attribution import fixtures


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread avoids OpenMP spin-waits on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_lr() -> fixtures.Trained:
    return fixtures.digits_lr()


@pytest.fixture(scope="session")
def digits_mlp() -> fixtures.Trained:
    return fixtures.digits_mlp()


@pytest.fixture(scope="session")
def wine_mlp() -> fixtures.Trained:
    return fixtures.wine_mlp()


@pytest.fixture(scope="session")
def digits_leakage() -> fixtures.Leakage:
    return fixtures.digits_leakage()
