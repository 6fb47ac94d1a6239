"""What the result pages show, gathered from the database, the score file and the shards, and
rendered with the Jinja2 templates beside this module (autoescaped)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.orm import Session

from service.api import scores as score_files
from service.api.errors import ServiceError
from service.api.schemas import QueryOut, RankedRow, query_out
from service.api.ui.charts import histogram_svg
from service.api.ui.previews import Preview, dataset_rows, query_samples
from service.db.models import Dataset, Model, Query, QueryStatus
from service.db.repositories import jobs as job_repo
from service.settings import Settings
from service.version import package_version

TEMPLATES = Path(__file__).parent / "templates"
REFRESH_SECONDS = 2


@cache
def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
                       trim_blocks=True, lstrip_blocks=True)


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(version=package_version(), **context)


@dataclass(frozen=True)
class RankedView:
    """A ranked row with its preview (`preview` text sent by the worker wins over the shard's)."""

    row: RankedRow
    preview: Preview | None

    @property
    def text(self) -> str | None:
        return self.row.preview or (self.preview.text if self.preview else None)


def query_page(session: Session, settings: Settings, query: Query, sample: int) -> str:
    """The HTML of one query's page; `sample` picks the ranking shown in per_sample mode."""
    out = query_out(query)
    model, dataset = job_repo.model_and_dataset(session, query)
    top, bottom, sample = _ranking(out, sample)
    rows_shown = out.group_by == "row" and dataset is not None
    previews = dataset_rows(settings, dataset, [r.index for r in top + bottom]) if rows_shown and dataset else {}
    histogram: Markup | None = None
    scores_note = None
    if query.status == QueryStatus.SUCCEEDED.value:
        try:
            scores = score_files.load_scores(score_files.score_file(settings, query))
            row = np.asarray(scores[sample] if scores.ndim == 2 else scores)
            histogram = histogram_svg(row, marks={"top-1": top[0].score} if top else None)
        except ServiceError as exc:
            scores_note = exc.detail
    return render(
        "query.html", query=out, model=model, dataset=dataset, sample=sample, provenance=_provenance(out, model, dataset),
        samples=query_samples(query.samples), histogram=histogram, scores_note=scores_note,
        top=[RankedView(r, previews.get(r.index)) for r in top],
        bottom=[RankedView(r, previews.get(r.index)) for r in bottom],
        refresh=REFRESH_SECONDS if not QueryStatus(query.status).is_final else None,
    )


def _ranking(out: QueryOut, sample: int) -> tuple[list[RankedRow], list[RankedRow], int]:
    if out.result is None:
        return [], [], 0
    if out.result.per_sample:
        chosen = next((s for s in out.result.per_sample if s.sample == sample), out.result.per_sample[0])
        return chosen.top, chosen.bottom, chosen.sample
    return out.result.top, out.result.bottom, 0


def _provenance(out: QueryOut, model: Model | None, dataset: Dataset | None) -> list[tuple[str, str]]:
    """Label → value rows: what produced this result."""
    items: list[tuple[str, Any]] = [
        ("model", f"{model.name} ({model.id}), {model.format}/{model.task}, {model.num_parameters} parameters"
         if model else out.model_id),
        ("model sha256", model.sha256 if model else "—"),
        ("dataset", f"{dataset.name} ({dataset.id}), {dataset.num_samples} rows in {len(dataset.shards)} shards"
         if dataset else out.dataset_id),
        ("dataset sha256", dataset.sha256 if dataset else "—"),
        ("method", out.method), ("mode", out.mode), ("group_by", f"{out.group_by} ({out.group_reduce})"),
        ("top_k", out.top_k), ("query samples", out.num_query_samples),
        ("self_influence", out.self_influence), ("cached", out.cached),
        ("source query", out.source_query_id or "—"),
        ("created", out.created_at), ("started", out.started_at or "—"), ("finished", out.finished_at or "—"),
    ]
    if out.result is not None:
        items += [("rows scored", out.result.num_scored), ("scores shape", out.result.scores_shape)]
    recorded = out.result.provenance if out.result is not None else None
    if recorded is not None:  # what the worker recorded when it stored the result
        worker = recorded.worker
        items += [("code version", f"{recorded.code.version} (commit {recorded.code.commit or 'unknown'})"),
                  ("worker", f"{worker.host} pid {worker.pid}, device {worker.device}, torch {worker.torch}, "
                             f"Python {worker.python}"),
                  ("part jobs", recorded.num_parts)]
    else:
        items.append(("service version (this page)", package_version()))
    return [(label, str(value)) for label, value in items]


def list_page(queries: list[Query], *, limit: int, offset: int, next_offset: int | None,
              status: str | None) -> str:
    return render("queries.html", queries=[query_out(q, with_result=False) for q in queries], limit=limit,
                  offset=offset, next_offset=next_offset, status=status, statuses=[s.value for s in QueryStatus])
