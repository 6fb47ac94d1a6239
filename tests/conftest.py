"""Project-wide fixtures: the real Postgres and Redis servers used by integration tests.

`TEST_DATABASE_URL` (default: the `attribution_test` database on 127.0.0.1:5432) and
`TEST_REDIS_URL` (default: Redis database 15 on 127.0.0.1:6379) name them; `.ci/run`
starts the servers and creates the database. Embedded-mode tests use SQLite instead.

Under pytest-xdist each worker `gwN` gets its own database (`<name>_gwN`, created on demand)
and Redis database (`15 − N`), so parallel workers never share state; each worker also runs
torch on one thread, since the workers already occupy the cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest-xdist
_WORKER_INDEX = int(_XDIST_WORKER[2:]) if _XDIST_WORKER.startswith("gw") else 0


def _per_worker_database(url: str) -> str:
    if not _XDIST_WORKER:
        return url
    parsed = make_url(url)
    return parsed.set(database=f"{parsed.database}_{_XDIST_WORKER}").render_as_string(hide_password=False)


def _per_worker_redis(url: str) -> str:
    base, _, db = url.rpartition("/")
    return f"{base}/{int(db) - _WORKER_INDEX}" if _XDIST_WORKER and db.isdigit() else url


TEST_DATABASE_URL = _per_worker_database(
    os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/attribution_test")
)
TEST_REDIS_URL = _per_worker_redis(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))

if _XDIST_WORKER:
    import torch

    torch.set_num_threads(1)


def _ensure_database(url: str) -> None:
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}).scalar()
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated, emptied Postgres database for this test session."""
    from service.db.migrate import downgrade_base, upgrade_head
    from service.settings import Settings

    _ensure_database(TEST_DATABASE_URL)
    settings = Settings(database_url=TEST_DATABASE_URL)
    downgrade_base(settings)
    upgrade_head(settings)
    yield TEST_DATABASE_URL


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """Redis database 15, flushed before and after each test."""
    from redis import Redis

    client = Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()
    client.close()
