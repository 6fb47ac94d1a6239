"""Per-process memo of a query's registered model and dataset rows (read by fan-out parts)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlalchemy.orm import Session

from service.db.models import Dataset, Model, Query
from service.db.repositories import jobs as repo


class RowMemo:
    """Per-process memo of `(model id, dataset id) → (Model, Dataset)` rows (with the shards).

    Registered models and datasets never change (no update but the soft delete's
    `deleted_at`, which jobs ignore; no hard delete while a query refers to them), so every
    part of a query, and its merge, reads them from the database once per worker. The rows
    are detached and only read.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[tuple[str, str], tuple[Model, Dataset]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, session: Session, query: Query) -> tuple[Model | None, Dataset | None]:
        key = (query.model_id, query.dataset_id)
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        model_row, dataset_row = repo.model_and_dataset(session, query)
        if model_row is not None and dataset_row is not None:
            with self.lock:
                self.entries[key] = (model_row, dataset_row)
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
        return model_row, dataset_row



REGISTERED_ROWS = RowMemo()
