"""queries.stability and query_results.stability / rank_low / rank_high: rank stability

A query may ask for the rank stability of its ranked rows (`"stability": {"resamples": R}`,
`attribution.stability`): the request is kept on the query (it is part of the request hash),
and each ranked row stores the share of resamples keeping it in the top (bottom) k and the
5th–95th percentile interval of its resampled rank. Rows of queries that did not ask, and
every row stored before this revision, hold NULL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stability", sa.JSON(), nullable=True))
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stability", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rank_low", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rank_high", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.drop_column("rank_high")
        batch_op.drop_column("rank_low")
        batch_op.drop_column("stability")
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_column("stability")
