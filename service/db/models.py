"""ORM classes: the tables behind models, datasets, queries and their ranked results.

Every row carries `tenant`; repositories filter on it so a tenant never sees another's
rows. Ids are opaque 32-hex strings. Timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime}


class QueryStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in (QueryStatus.SUCCEEDED, QueryStatus.FAILED, QueryStatus.CANCELED)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (Index("ix_models_tenant_created", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256))
    uri: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    architecture: Mapped[str | None] = mapped_column(String(512), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    # trainable parameter names and those K-FAC cannot factor, recorded at registration
    structure: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(256))
    num_samples: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), comment="hash of the ordered shard hashes")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)

    shards: Mapped[list[Shard]] = relationship(
        back_populates="dataset", order_by="Shard.position", cascade="all, delete-orphan", lazy="selectin"
    )


class Shard(Base):
    __tablename__ = "dataset_shards"
    __table_args__ = (UniqueConstraint("dataset_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    num_samples: Mapped[int] = mapped_column(BigInteger)
    row_offset: Mapped[int] = mapped_column(BigInteger, comment="global index of the shard's first row")
    sha256: Mapped[str] = mapped_column(String(64))

    dataset: Mapped[Dataset] = relationship(back_populates="shards")


class Query(Base):
    __tablename__ = "queries"
    __table_args__ = (
        Index("ix_queries_tenant_created", "tenant", "created_at"),
        Index("ix_queries_request_hash_status", "tenant", "request_hash", "status", "finished_at"),
        UniqueConstraint("tenant", "idempotency_key", name="uq_queries_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    method: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(comment="validated params, defaults filled in")
    mode: Mapped[str] = mapped_column(String(16))
    self_influence: Mapped[bool] = mapped_column(default=False)
    top_k: Mapped[int] = mapped_column(Integer)
    samples: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, comment="the request's samples object")
    num_query_samples: Mapped[int] = mapped_column(Integer, default=0)
    request_hash: Mapped[str] = mapped_column(String(64), comment="content hash of model, data, samples, method, params")
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    group_by: Mapped[str] = mapped_column(String(16), default="row", server_default="row",
                                          comment="row | shard | group: what one score column stands for")
    group_reduce: Mapped[str] = mapped_column(String(8), default="mean", server_default="mean",
                                              comment="mean | sum: how row scores combine into a group score")
    stability: Mapped[dict[str, Any] | None] = mapped_column(
        nullable=True, comment='rank-stability request {"resamples": R}; null: not requested')

    status: Mapped[str] = mapped_column(String(16), default=QueryStatus.QUEUED.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    cached: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    num_parts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    num_scored: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    extras: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, comment="method-reported values (auto-tuned params, ...)")
    provenance: Mapped[dict[str, Any] | None] = mapped_column(
        nullable=True, comment="what produced the result (hashes, params, code, worker, timings); written once")
    scores_path: Mapped[str | None] = mapped_column(Text, nullable=True, comment="score file, relative to the scores dir")
    scores_shape: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    source_query_id: Mapped[str | None] = mapped_column(String(32), nullable=True, comment="for cached answers: the query that computed it")

    results: Mapped[list[QueryResult]] = relationship(
        back_populates="query", order_by="(QueryResult.kind, QueryResult.rank)", cascade="all, delete-orphan", lazy="selectin"
    )
    parts: Mapped[list[QueryPart]] = relationship(
        back_populates="query", order_by="QueryPart.part", cascade="all, delete-orphan", lazy="selectin"
    )


class QueryResult(Base):
    """One ranked training row of a finished query (`kind` is `top` or `bottom`).

    In `per_sample` mode `sample` is the query sample's position; in joint mode 0.
    """

    __tablename__ = "query_results"
    __table_args__ = (Index("ix_query_results_query", "query_id", "kind", "sample", "rank"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    query_id: Mapped[str] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    sample: Mapped[int] = mapped_column(Integer, default=0)
    rank: Mapped[int] = mapped_column(Integer)
    index: Mapped[int] = mapped_column(BigInteger)
    sample_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    shard: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    preview: Mapped[str | None] = mapped_column(Text, nullable=True,
                                                comment="first characters of a text row (language-model datasets)")
    # rank stability (`attribution.stability`), when the query asked for it
    stability: Mapped[float | None] = mapped_column(Float, nullable=True,
                                                    comment="share of resamples keeping the row in the top (bottom) k")
    rank_low: Mapped[int | None] = mapped_column(Integer, nullable=True, comment="5th percentile of its resampled rank")
    rank_high: Mapped[int | None] = mapped_column(Integer, nullable=True, comment="95th percentile of its resampled rank")

    query: Mapped[Query] = relationship(back_populates="results")


class QueryPart(Base):
    """One fan-out part of a query: global rows `[row_start, row_stop)` scored by one job."""

    __tablename__ = "query_parts"
    __table_args__ = (UniqueConstraint("query_id", "part"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    query_id: Mapped[str] = mapped_column(ForeignKey("queries.id", ondelete="CASCADE"))
    part: Mapped[int] = mapped_column(Integer)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_stop: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=QueryStatus.QUEUED.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    scores_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    query: Mapped[Query] = relationship(back_populates="parts")
