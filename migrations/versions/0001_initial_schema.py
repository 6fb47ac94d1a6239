"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24 15:23:49.255866
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "datasets",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("num_samples", sa.BigInteger(), nullable=False),
        sa.Column(
            "sha256",
            sa.String(length=64),
            nullable=False,
            comment="hash of the ordered shard hashes",
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.create_index("ix_datasets_tenant_created", ["tenant", "created_at"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("architecture", sa.String(length=512), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index("ix_models_tenant_created", ["tenant", "created_at"], unique=False)

    op.create_table(
        "dataset_shards",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("dataset_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("num_samples", sa.BigInteger(), nullable=False),
        sa.Column(
            "row_offset",
            sa.BigInteger(),
            nullable=False,
            comment="global index of the shard's first row",
        ),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "position"),
    )
    op.create_table(
        "queries",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=128), nullable=False),
        sa.Column("model_id", sa.String(length=32), nullable=False),
        sa.Column("dataset_id", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column(
            "params", sa.JSON(), nullable=False, comment="validated params, defaults filled in"
        ),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("self_influence", sa.Boolean(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("samples", sa.JSON(), nullable=True, comment="the request's samples object"),
        sa.Column("num_query_samples", sa.Integer(), nullable=False),
        sa.Column(
            "request_hash",
            sa.String(length=64),
            nullable=False,
            comment="content hash of model, data, samples, method, params",
        ),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("num_parts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("num_scored", sa.BigInteger(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column(
            "extras",
            sa.JSON(),
            nullable=True,
            comment="method-reported values (auto-tuned params, ...)",
        ),
        sa.Column(
            "scores_path",
            sa.Text(),
            nullable=True,
            comment="score file, relative to the scores dir",
        ),
        sa.Column("scores_shape", sa.JSON(), nullable=True),
        sa.Column(
            "source_query_id",
            sa.String(length=32),
            nullable=True,
            comment="for cached answers: the query that computed it",
        ),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_queries_idempotency"),
    )
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.create_index("ix_queries_request_hash", ["tenant", "request_hash"], unique=False)
        batch_op.create_index("ix_queries_tenant_created", ["tenant", "created_at"], unique=False)

    op.create_table(
        "query_parts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("query_id", sa.String(length=32), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("row_start", sa.BigInteger(), nullable=False),
        sa.Column("row_stop", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("scores_path", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("query_id", "part"),
    )
    op.create_table(
        "query_results",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("query_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("index", sa.BigInteger(), nullable=False),
        sa.Column("sample_id", sa.String(length=256), nullable=True),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["query_id"], ["queries.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_query_results_query", ["query_id", "kind", "sample", "rank"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("query_results", schema=None) as batch_op:
        batch_op.drop_index("ix_query_results_query")

    op.drop_table("query_results")
    op.drop_table("query_parts")
    with op.batch_alter_table("queries", schema=None) as batch_op:
        batch_op.drop_index("ix_queries_tenant_created")
        batch_op.drop_index("ix_queries_request_hash")

    op.drop_table("queries")
    op.drop_table("dataset_shards")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index("ix_models_tenant_created")

    op.drop_table("models")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_index("ix_datasets_tenant_created")

    op.drop_table("datasets")
