"""`/v1/models`: register (load once to validate), read, list, soft-delete."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from service.api import registration
from service.api.deps import PageDep, SessionDep, SettingsDep, TenantDep
from service.api.errors import NotFound
from service.api.schemas import ModelCreate, ModelOut, Page, page_of
from service.db.models import Model
from service.db.repositories import models as model_repo

router = APIRouter(prefix="/v1/models", tags=["models"])


def _owned(session: Session, tenant: str, model_id: str) -> Model:
    model = model_repo.get_model(session, tenant, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found", code="model_not_found")
    return model


@router.post("", status_code=201, response_model=ModelOut)
def create_model(
    body: ModelCreate, response: Response, settings: SettingsDep, session: SessionDep, tenant: TenantDep
) -> ModelOut:
    """Register a model file; it is loaded once to validate it (422 with the reason if it does not load)."""
    model = registration.register_model(session, settings, tenant, body)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return ModelOut.model_validate(model)


@router.get("", response_model=Page[ModelOut])
def list_models(page: PageDep, session: SessionDep, tenant: TenantDep) -> Page[ModelOut]:
    """The tenant's models, newest first."""
    rows = model_repo.list_models(session, tenant, limit=page.limit + 1, offset=page.offset)
    return page_of([ModelOut.model_validate(m) for m in rows], limit=page.limit, offset=page.offset)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return ModelOut.model_validate(_owned(session, tenant, model_id))


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Soft-delete: the model disappears from reads; queries that used it keep their results."""
    model_repo.soft_delete_model(session, _owned(session, tenant, model_id))
    session.commit()
    return Response(status_code=204)
