"""`/v1/datasets`: register (inspect every shard), read, list, soft-delete."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from service.api import registration
from service.api.deps import PageDep, SessionDep, SettingsDep, TenantDep
from service.api.errors import NotFound
from service.api.schemas import DatasetCreate, DatasetOut, Page, page_of
from service.db.models import Dataset
from service.db.repositories import datasets as dataset_repo

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _owned(session: Session, tenant: str, dataset_id: str) -> Dataset:
    dataset = dataset_repo.get_dataset(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
    return dataset


@router.post("", status_code=201, response_model=DatasetOut)
def create_dataset(
    body: DatasetCreate, response: Response, settings: SettingsDep, session: SessionDep, tenant: TenantDep
) -> DatasetOut:
    """Register training data as ordered shards; a row's global index is its position across them."""
    dataset = registration.register_dataset(session, settings, tenant, body)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetOut.model_validate(dataset)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(page: PageDep, session: SessionDep, tenant: TenantDep) -> Page[DatasetOut]:
    """The tenant's datasets, newest first."""
    rows = dataset_repo.list_datasets(session, tenant, limit=page.limit + 1, offset=page.offset)
    return page_of([DatasetOut.model_validate(d) for d in rows], limit=page.limit, offset=page.offset)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    return DatasetOut.model_validate(_owned(session, tenant, dataset_id))


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Soft-delete: the dataset disappears from reads; queries that used it keep their results."""
    dataset_repo.soft_delete_dataset(session, _owned(session, tenant, dataset_id))
    session.commit()
    return Response(status_code=204)
