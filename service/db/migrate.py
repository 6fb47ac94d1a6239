"""Run Alembic migrations programmatically (embedded start-up, tests, the `migrate` step)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from service.settings import Settings

_ROOT = Path(__file__).resolve().parents[2]


def alembic_config(settings: Settings) -> Config:
    config = Config(str(_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.effective_database_url.replace("%", "%%"))
    return config


def upgrade_head(settings: Settings) -> None:
    if settings.database_url is None:
        settings.service_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), "head")


def downgrade_base(settings: Settings) -> None:
    command.downgrade(alembic_config(settings), "base")
