"""HTTP routes: `/v1` resources (models, datasets, queries) and operations endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import datasets, models, ops, queries

ROUTERS: tuple[APIRouter, ...] = (ops.router, models.router, datasets.router, queries.router)
