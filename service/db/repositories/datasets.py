"""SQL for registered datasets and their shards."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Dataset, Shard, utcnow
from service.db.repositories import is_resource_id


@dataclass(frozen=True)
class NewShard:
    uri: str
    format: str
    num_samples: int
    sha256: str


def add_dataset(session: Session, *, tenant: str, name: str, sha256: str, shards: list[NewShard]) -> Dataset:
    """Insert a dataset with its shards in order; each shard's `row_offset` is the global
    index of its first row (the sum of the sizes of the shards before it)."""
    dataset = Dataset(tenant=tenant, name=name, sha256=sha256, num_samples=sum(s.num_samples for s in shards))
    offset = 0
    for position, shard in enumerate(shards):
        dataset.shards.append(Shard(position=position, uri=shard.uri, format=shard.format,
                                    num_samples=shard.num_samples, row_offset=offset, sha256=shard.sha256))
        offset += shard.num_samples
    session.add(dataset)
    session.flush()
    return dataset


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset | None:
    """The tenant's live (not deleted) dataset with its shards, or None."""
    if not is_resource_id(dataset_id):
        return None
    return session.scalars(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant == tenant, Dataset.deleted_at.is_(None))
    ).one_or_none()


def list_datasets(session: Session, tenant: str, *, limit: int, offset: int) -> list[Dataset]:
    """Newest first; `limit` rows from `offset`."""
    return list(session.scalars(
        select(Dataset).where(Dataset.tenant == tenant, Dataset.deleted_at.is_(None))
        .order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit).offset(offset)
    ))


def soft_delete_dataset(session: Session, dataset: Dataset) -> None:
    """Hide the dataset; queries that reference it keep their results."""
    dataset.deleted_at = utcnow()
    session.flush()
