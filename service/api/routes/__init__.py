"""HTTP routes: `/v1` resources (models, datasets, queries), operations endpoints, `/ui` result pages."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import datasets, models, ops, queries, ui

ROUTERS: tuple[APIRouter, ...] = (ops.router, models.router, datasets.router, queries.router, ui.router)
