"""Per-process memo of a query's registered model and dataset rows (read by fan-out parts)."""

from __future__ import annotations

from functools import lru_cache

from service.db.models import Dataset, Model, Query
from service.db.session import session_scope
from service.settings import get_settings

ROWS_KEPT = 64


def registered_rows(query: Query) -> tuple[Model | None, Dataset | None]:
    """The `(Model, Dataset)` rows (with the shards) `query` names; `(None, None)` if either is gone.

    Registered models and datasets never change (no update but the soft delete's
    `deleted_at`, which jobs ignore; no hard delete while a query refers to them), so every
    part of a query, and its merge, reads them from the database once per worker. The rows
    are detached and only read.
    """
    try:
        return _registered(query.model_id, query.dataset_id)
    except LookupError:
        return None, None


@lru_cache(maxsize=ROWS_KEPT)
def _registered(model_id: str, dataset_id: str) -> tuple[Model, Dataset]:
    """Both rows, read in a session of their own; raises `LookupError` (not memoised) if one is missing."""
    with session_scope(get_settings()) as session:
        model_row, dataset_row = session.get(Model, model_id), session.get(Dataset, dataset_id)
    if model_row is None or dataset_row is None:
        raise LookupError(f"model {model_id} or dataset {dataset_id} is not registered")
    return model_row, dataset_row
