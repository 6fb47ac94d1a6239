"""SQL for registered models."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Model, utcnow
from service.db.repositories import is_resource_id


def add_model(
    session: Session, *, tenant: str, name: str, uri: str, format: str, task: str,
    architecture: str | None, sha256: str, num_parameters: int, structure: dict[str, Any] | None = None,
) -> Model:
    model = Model(tenant=tenant, name=name, uri=uri, format=format, task=task,
                  architecture=architecture, sha256=sha256, num_parameters=num_parameters, structure=structure)
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, tenant: str, model_id: str) -> Model | None:
    """The tenant's live (not deleted) model, or None."""
    if not is_resource_id(model_id):
        return None
    return session.scalars(
        select(Model).where(Model.id == model_id, Model.tenant == tenant, Model.deleted_at.is_(None))
    ).one_or_none()


def list_models(session: Session, tenant: str, *, limit: int, offset: int) -> list[Model]:
    """Newest first; `limit` rows from `offset`."""
    return list(session.scalars(
        select(Model).where(Model.tenant == tenant, Model.deleted_at.is_(None))
        .order_by(Model.created_at.desc(), Model.id.desc()).limit(limit).offset(offset)
    ))


def soft_delete_model(session: Session, model: Model) -> None:
    """Hide the model; queries that reference it keep their results."""
    model.deleted_at = utcnow()
    session.flush()
