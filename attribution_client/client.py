"""`Client` (synchronous) and `AsyncClient`: the v1 REST API as Python calls with typed results.

```python
from attribution_client import Client

client = Client()                       # ATTRIBUTION_URL, ATTRIBUTION_API_KEY from the environment
model = client.register_model("digits-mlp", "file:///data/example/mlp.pt", task="classification")
dataset = client.register_dataset("digits", ["file:///data/example/train-000.npz"])
handle = client.query(model, dataset, x=x, y=y, params={"normalize": "relative"})
frame = handle.wait(progress=True).to_pandas()
```
Both clients share the request bodies (`requests`), the retry policy (`transport`) and the typed
models; only the I/O differs. Every error the service answers is raised as `ApiError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np

from attribution_client import requests as bodies
from attribution_client.handle import AsyncQueryHandle, QueryHandle
from attribution_client.models import Dataset, Estimate, Model, Query
from attribution_client.transport import ClientConfig, checked, may_retry, unreachable


def as_uri(location: str | Path) -> str:
    """A `file://` URI for a local path (resolved); strings that already are URIs pass unchanged.
    The path must be where the *server* sees the file (inside its DATA_ROOT)."""
    if isinstance(location, Path) or "://" not in location:
        return Path(location).resolve().as_uri()
    return location


def _page_params(limit: int, offset: int, **filters: str | None) -> dict[str, Any]:
    return {"limit": limit, "offset": offset} | {k: v for k, v in filters.items() if v is not None}


class Client:
    """Synchronous client. `url`/`api_key` default to `ATTRIBUTION_URL`/`ATTRIBUTION_API_KEY`;
    `retries`, `backoff`, `timeout` tune the transport (`transport.ClientConfig`); `transport`
    replaces httpx's own (e.g. a proxy, or a test's fault injection)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.BaseTransport | None = None, **options: Any) -> None:
        self.config = ClientConfig.resolve(url, api_key, **options)
        self._http = httpx.Client(base_url=self.config.url, headers=self.config.headers(),
                                  timeout=self.config.timeout, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ models and datasets
    def register_model(self, name: str, uri: str | Path, *, task: str, format: str = "auto",
                       architecture: str | None = None) -> Model:
        body = bodies.model_body(name, as_uri(uri), task, format, architecture)
        return Model.model_validate_json(self._request("POST", "/v1/models", json=body).content)

    def get_model(self, model_id: str) -> Model:
        return Model.model_validate_json(self._request("GET", f"/v1/models/{model_id}").content)

    def list_models(self, limit: int = 50, offset: int = 0) -> list[Model]:
        page = self._request("GET", "/v1/models", params=_page_params(limit, offset)).json()
        return [Model.model_validate(item) for item in page["items"]]

    def register_dataset(self, name: str, shards: Sequence[str | Path]) -> Dataset:
        body = bodies.dataset_body(name, [as_uri(s) for s in shards])
        return Dataset.model_validate_json(self._request("POST", "/v1/datasets", json=body).content)

    def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate_json(self._request("GET", f"/v1/datasets/{dataset_id}").content)

    def list_datasets(self, limit: int = 50, offset: int = 0) -> list[Dataset]:
        page = self._request("GET", "/v1/datasets", params=_page_params(limit, offset)).json()
        return [Dataset.model_validate(item) for item in page["items"]]

    # ------------------------------------------------------------------ queries
    def query(self, model: str | Model, dataset: str | Dataset, samples: Mapping[str, Any] | None = None, *,
              x: Any = None, y: Any = None, text: Any = None, method: str = "forward_inf", top_k: int = 10,
              params: Mapping[str, Any] | None = None, mode: str = "joint", self_influence: bool = False,
              idempotency_key: str | None = None, **extra: Any) -> QueryHandle:
        """Submit a query (samples as `samples={...}` or `x=`, `y=`, `text=`; numpy arrays welcome);
        a handle to `.wait()` on. Retried POSTs carry one `Idempotency-Key`: never two queries."""
        body = bodies.query_body(model, dataset, method=method, top_k=top_k, params=params, mode=mode,
                                 self_influence=self_influence, extra=extra,
                                 samples=bodies.samples_payload(samples, {"x": x, "y": y, "text": text}))
        key = idempotency_key or bodies.new_idempotency_key()
        response = self._request("POST", "/v1/queries", json=body, headers={"Idempotency-Key": key}, repeatable=True)
        return QueryHandle(self, Query.model_validate_json(response.content))

    def estimate(self, model: str | Model, dataset: str | Dataset, samples: Mapping[str, Any] | None = None, *,
                 x: Any = None, y: Any = None, text: Any = None, method: str = "forward_inf", top_k: int = 10,
                 params: Mapping[str, Any] | None = None, mode: str = "joint", self_influence: bool = False,
                 **extra: Any) -> Estimate:
        """The predicted cost of `query(...)` with the same arguments (`?dry_run=true`): seconds,
        peak memory, rows × passes and which cached parts are warm. Nothing is stored or run."""
        body = bodies.query_body(model, dataset, method=method, top_k=top_k, params=params, mode=mode,
                                 self_influence=self_influence, extra=extra,
                                 samples=bodies.samples_payload(samples, {"x": x, "y": y, "text": text}))
        response = self._request("POST", "/v1/queries", json=body, params={"dry_run": "true"}, repeatable=True)
        return Estimate.model_validate_json(response.content)

    def handle(self, query_id: str) -> QueryHandle:
        """A handle on an existing query."""
        return QueryHandle(self, self.get_query(query_id))

    def get_query(self, query_id: str) -> Query:
        return Query.model_validate_json(self._request("GET", f"/v1/queries/{query_id}").content)

    def list_queries(self, limit: int = 50, offset: int = 0, *, status: str | None = None,
                     model_id: str | None = None) -> list[Query]:
        params = _page_params(limit, offset, status=status, model_id=model_id)
        return [Query.model_validate(item) for item in self._request("GET", "/v1/queries", params=params).json()["items"]]

    def cancel_query(self, query_id: str) -> Query:
        return Query.model_validate_json(self._request("DELETE", f"/v1/queries/{query_id}").content)

    def scores(self, query_id: str) -> np.ndarray:
        """float32 `[N]` (`[Q, N]` per_sample) scores of a succeeded query, in global row order."""
        response = self._request("GET", f"/v1/queries/{query_id}/scores", params={"format": "npy"})
        return bodies.scores_from_npy(response.content)

    # ------------------------------------------------------------------ transport
    def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, repeatable: bool | None = None) -> httpx.Response:
        repeat = method in ("GET", "DELETE") if repeatable is None else repeatable
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:
                if not may_retry(attempt=attempt, config=self.config, repeatable=repeat, error=exc):
                    raise unreachable(self.config, exc) from exc
                time.sleep(self.config.delay(attempt, None))
            else:
                if not may_retry(attempt=attempt, config=self.config, repeatable=repeat, response=response):
                    return checked(response)
                time.sleep(self.config.delay(attempt, response))
            attempt += 1


class AsyncClient:
    """The same API as `Client`, for `asyncio`: every call is awaited; `query` returns an
    `AsyncQueryHandle` whose `wait`, `scores`, `refresh` and `cancel` are awaited too."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None, **options: Any) -> None:
        self.config = ClientConfig.resolve(url, api_key, **options)
        self._http = httpx.AsyncClient(base_url=self.config.url, headers=self.config.headers(),
                                       timeout=self.config.timeout, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def register_model(self, name: str, uri: str | Path, *, task: str, format: str = "auto",
                             architecture: str | None = None) -> Model:
        body = bodies.model_body(name, as_uri(uri), task, format, architecture)
        return Model.model_validate_json((await self._request("POST", "/v1/models", json=body)).content)

    async def get_model(self, model_id: str) -> Model:
        return Model.model_validate_json((await self._request("GET", f"/v1/models/{model_id}")).content)

    async def list_models(self, limit: int = 50, offset: int = 0) -> list[Model]:
        page = (await self._request("GET", "/v1/models", params=_page_params(limit, offset))).json()
        return [Model.model_validate(item) for item in page["items"]]

    async def register_dataset(self, name: str, shards: Sequence[str | Path]) -> Dataset:
        body = bodies.dataset_body(name, [as_uri(s) for s in shards])
        return Dataset.model_validate_json((await self._request("POST", "/v1/datasets", json=body)).content)

    async def get_dataset(self, dataset_id: str) -> Dataset:
        return Dataset.model_validate_json((await self._request("GET", f"/v1/datasets/{dataset_id}")).content)

    async def list_datasets(self, limit: int = 50, offset: int = 0) -> list[Dataset]:
        page = (await self._request("GET", "/v1/datasets", params=_page_params(limit, offset))).json()
        return [Dataset.model_validate(item) for item in page["items"]]

    async def query(self, model: str | Model, dataset: str | Dataset, samples: Mapping[str, Any] | None = None, *,
                    x: Any = None, y: Any = None, text: Any = None, method: str = "forward_inf", top_k: int = 10,
                    params: Mapping[str, Any] | None = None, mode: str = "joint", self_influence: bool = False,
                    idempotency_key: str | None = None, **extra: Any) -> AsyncQueryHandle:
        body = bodies.query_body(model, dataset, method=method, top_k=top_k, params=params, mode=mode,
                                 self_influence=self_influence, extra=extra,
                                 samples=bodies.samples_payload(samples, {"x": x, "y": y, "text": text}))
        key = idempotency_key or bodies.new_idempotency_key()
        response = await self._request("POST", "/v1/queries", json=body, headers={"Idempotency-Key": key},
                                       repeatable=True)
        return AsyncQueryHandle(self, Query.model_validate_json(response.content))

    async def estimate(self, model: str | Model, dataset: str | Dataset, samples: Mapping[str, Any] | None = None,
                       *, x: Any = None, y: Any = None, text: Any = None, method: str = "forward_inf",
                       top_k: int = 10, params: Mapping[str, Any] | None = None, mode: str = "joint",
                       self_influence: bool = False, **extra: Any) -> Estimate:
        """`Client.estimate`: the predicted cost of the query; nothing is stored or run."""
        body = bodies.query_body(model, dataset, method=method, top_k=top_k, params=params, mode=mode,
                                 self_influence=self_influence, extra=extra,
                                 samples=bodies.samples_payload(samples, {"x": x, "y": y, "text": text}))
        response = await self._request("POST", "/v1/queries", json=body, params={"dry_run": "true"},
                                       repeatable=True)
        return Estimate.model_validate_json(response.content)

    async def handle(self, query_id: str) -> AsyncQueryHandle:
        return AsyncQueryHandle(self, await self.get_query(query_id))

    async def get_query(self, query_id: str) -> Query:
        return Query.model_validate_json((await self._request("GET", f"/v1/queries/{query_id}")).content)

    async def list_queries(self, limit: int = 50, offset: int = 0, *, status: str | None = None,
                           model_id: str | None = None) -> list[Query]:
        params = _page_params(limit, offset, status=status, model_id=model_id)
        page = (await self._request("GET", "/v1/queries", params=params)).json()
        return [Query.model_validate(item) for item in page["items"]]

    async def cancel_query(self, query_id: str) -> Query:
        return Query.model_validate_json((await self._request("DELETE", f"/v1/queries/{query_id}")).content)

    async def scores(self, query_id: str) -> np.ndarray:
        response = await self._request("GET", f"/v1/queries/{query_id}/scores", params={"format": "npy"})
        return bodies.scores_from_npy(response.content)

    async def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                       headers: Mapping[str, str] | None = None, repeatable: bool | None = None) -> httpx.Response:
        repeat = method in ("GET", "DELETE") if repeatable is None else repeatable
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:
                if not may_retry(attempt=attempt, config=self.config, repeatable=repeat, error=exc):
                    raise unreachable(self.config, exc) from exc
                await asyncio.sleep(self.config.delay(attempt, None))
            else:
                if not may_retry(attempt=attempt, config=self.config, repeatable=repeat, response=response):
                    return checked(response)
                await asyncio.sleep(self.config.delay(attempt, response))
            attempt += 1
