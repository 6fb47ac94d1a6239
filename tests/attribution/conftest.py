"""Session-scoped trained models shared by the core-library tests (see fixtures.py)."""

from __future__ import annotations

import pytest

from tests.attribution import fixtures


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
