"""queries.group_by and queries.group_reduce (group attribution)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 16:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            "group_by", sa.String(length=16), nullable=False, server_default="row",
            comment="row | shard | group: what one score column stands for",
        ))
        batch_op.add_column(sa.Column(
            "group_reduce", sa.String(length=8), nullable=False, server_default="mean",
            comment="mean | sum: how row scores combine into a group score",
        ))


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("group_reduce")
        batch_op.drop_column("group_by")
