"""query_results: a short preview of each ranked row's training text

Language-model datasets rank text rows; a user reads the ranking by the text, not the
index. The worker stores the first 200 characters of a text row beside its rank.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 12:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preview", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.drop_column("preview")
