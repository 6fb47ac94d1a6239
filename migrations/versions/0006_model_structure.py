"""models: `structure`, the registered module's trainable parameters and what K-FAC can factor

Recorded once at registration (`loading.models.model_structure`) so that
`POST /v1/queries` can refuse, with a 422 naming what works, a query whose `layers` match no
parameter or whose `ihvp: kfac|ekfac` cannot factor a tracked parameter — without loading
the model. Rows registered before this revision hold NULL (not checked).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("structure", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("structure")
