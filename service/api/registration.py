"""Registering models and datasets: resolve each `file://` URI, inspect the file once, store.

A model is loaded once (`inspect_model`) so a file that does not load is refused at
registration with 422 and the reason; its content hash and parameter count are recorded.
A dataset's shards are inspected in the given order; a row's global index is its position
across the shards, and the dataset hash is the hash of the ordered shard hashes.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from loading import dataset_sha256, inspect_model, inspect_shard, resolve_uri
from loading.errors import LoadError
from service.api.errors import invalid_from_load_error
from service.api.schemas import DatasetCreate, ModelCreate
from service.api.storing import commit_created
from service.db.models import Dataset, Model
from service.db.repositories import datasets as dataset_repo
from service.db.repositories import models as model_repo
from service.settings import Settings


def register_model(session: Session, settings: Settings, tenant: str, body: ModelCreate) -> Model:
    try:
        path = resolve_uri(body.uri, settings.data_root)
        info = inspect_model(path, body.format, body.task, architecture=body.architecture,
                             allowlist=settings.architecture_allowlist)
    except LoadError as exc:
        raise invalid_from_load_error(exc) from exc
    model = model_repo.add_model(
        session, tenant=tenant, name=body.name, uri=body.uri, format=info.format, task=body.task,
        architecture=body.architecture, sha256=info.sha256, num_parameters=info.num_parameters,
        structure=info.structure,
    )
    commit_created(session, what="model", recovery="list your models (GET /v1/models) before registering it again")
    return model


def register_dataset(session: Session, settings: Settings, tenant: str, body: DatasetCreate) -> Dataset:
    shards: list[dataset_repo.NewShard] = []
    for position, shard in enumerate(body.shards):
        try:
            info = inspect_shard(resolve_uri(shard.uri, settings.data_root))
        except LoadError as exc:
            raise invalid_from_load_error(exc, field_prefix=f"shards[{position}]") from exc
        shards.append(dataset_repo.NewShard(uri=shard.uri, format=info.format,
                                            num_samples=info.num_samples, sha256=info.sha256))
    dataset = dataset_repo.add_dataset(
        session, tenant=tenant, name=body.name, sha256=dataset_sha256([s.sha256 for s in shards]), shards=shards,
    )
    commit_created(session, what="dataset",
                   recovery="list your datasets (GET /v1/datasets) before registering it again")
    return dataset
