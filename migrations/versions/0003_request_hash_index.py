"""queries: index the repeat-query lookup by (tenant, request_hash, status, finished_at)

`find_succeeded` asks for the tenant's most recent succeeded query with a request hash.
Every cached answer is itself a succeeded query with that hash, so under the old index
(tenant, request_hash) the lookup read and sorted every earlier repeat (22 ms after 6,000
repeats of one query); with status and finished_at in the index it reads one entry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 19:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index("ix_queries_request_hash")
        batch_op.create_index("ix_queries_request_hash_status",
                              ["tenant", "request_hash", "status", "finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index("ix_queries_request_hash_status")
        batch_op.create_index("ix_queries_request_hash", ["tenant", "request_hash"], unique=False)
