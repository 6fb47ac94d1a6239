"""Handles on a submitted query: wait for it (with a progress bar), then read its ranking.

`client.query(...)` returns a `QueryHandle` (`AsyncQueryHandle` from `AsyncClient`):
`.wait(progress=True)` polls `GET /v1/queries/{id}` until the query is final and returns the
handle (so calls chain: `client.query(...).wait().to_pandas()`); `.top()` / `.bottom()` are the
ranked rows, `.scores()` every training row's score as a numpy array `[N]` (`[Q, N]` per_sample),
`.to_pandas()` the ranked rows as a DataFrame (needs pandas: `pip install attribution-service[client]`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal

import numpy as np

from attribution_client.errors import AttributionError, QueryFailed, WaitTimeout
from attribution_client.models import Query, QueryResult, RankedRow
from attribution_client.progress import QueryProgress

if TYPE_CHECKING:
    import pandas

    from attribution_client.client import AsyncClient, Client

RankedKind = Literal["top", "bottom"]
ROW_COLUMNS = ("rank", "index", "sample_id", "shard", "score")


class _QueryView:
    """What both handles read from the query's last known state, without I/O."""

    query: Query

    @property
    def id(self) -> str:
        return self.query.id

    @property
    def status(self) -> str:
        return self.query.status

    @property
    def result(self) -> QueryResult:
        """The result of a succeeded query; `QueryFailed` if it failed, an error if still open."""
        if self.query.status in ("failed", "canceled"):
            raise QueryFailed(self.query)
        if self.query.result is None:
            raise AttributionError(f"query {self.id} is {self.query.status}; call wait() first")
        return self.query.result

    def top(self, k: int | None = None) -> list[RankedRow]:
        """The highest-scoring training rows (most supportive), best first; at most `k`."""
        return self.result.top[:k]

    def bottom(self, k: int | None = None) -> list[RankedRow]:
        """The lowest-scoring training rows (most opposing), lowest first; at most `k`."""
        return self.result.bottom[:k]

    def to_pandas(self, kind: RankedKind = "top") -> pandas.DataFrame:
        """The ranked rows as a DataFrame: rank, index, sample_id, shard, score (+ `stability`,
        `rank_low`, `rank_high` when the query asked for rank stability; + `preview` when the
        server sends previews; + `sample` in per_sample mode, one block per query sample)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_pandas() needs pandas: pip install 'attribution-service[client]'") from exc
        result = self.result
        blocks = ([(s.sample, getattr(s, kind)) for s in result.per_sample] if result.per_sample
                  else [(None, getattr(result, kind))])
        records = [{"sample": sample, **row.model_dump()} for sample, rows in blocks for row in rows]
        columns = (["sample"] if result.per_sample else []) + list(ROW_COLUMNS)
        if any(r.get("stability") is not None for r in records):
            columns += ["stability", "rank_low", "rank_high"]
        if any(r.get("preview") is not None for r in records):
            columns.append("preview")
        return pd.DataFrame.from_records(records, columns=columns)

    def _check_final(self) -> None:
        if self.query.status in ("failed", "canceled"):
            raise QueryFailed(self.query)


class QueryHandle(_QueryView):
    """A query submitted through the synchronous `Client`."""

    def __init__(self, client: Client, query: Query) -> None:
        self._client = client
        self.query = query

    def refresh(self) -> QueryHandle:
        self.query = self._client.get_query(self.id)
        return self

    def wait(self, progress: bool = False, timeout: float | None = None, poll_interval: float = 0.2) -> QueryHandle:
        """Poll until the query is final (a tqdm bar when `progress`); `QueryFailed` if it failed or
        was canceled, `WaitTimeout` after `timeout` seconds (the query keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = QueryProgress(progress, self.id)
        try:
            while True:
                bar.update(self.query)
                if self.query.is_final:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(self.query, timeout or 0.0)
                time.sleep(poll_interval)
                self.refresh()
        finally:
            bar.close()
        self._check_final()
        return self

    def scores(self) -> np.ndarray:
        """Every training row's score, float32 `[N]` (`[Q, N]` per_sample), in global row order."""
        return self._client.scores(self.id)

    def cancel(self) -> QueryHandle:
        self.query = self._client.cancel_query(self.id)
        return self

    def __repr__(self) -> str:
        return f"QueryHandle(id={self.id!r}, status={self.status!r}, progress={self.query.progress:.2f})"


class AsyncQueryHandle(_QueryView):
    """A query submitted through `AsyncClient`: the same surface, awaited."""

    def __init__(self, client: AsyncClient, query: Query) -> None:
        self._client = client
        self.query = query

    async def refresh(self) -> AsyncQueryHandle:
        self.query = await self._client.get_query(self.id)
        return self

    async def wait(self, progress: bool = False, timeout: float | None = None,
                   poll_interval: float = 0.2) -> AsyncQueryHandle:
        """As `QueryHandle.wait`, sleeping with `asyncio.sleep` between polls."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = QueryProgress(progress, self.id)
        try:
            while True:
                bar.update(self.query)
                if self.query.is_final:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(self.query, timeout or 0.0)
                await asyncio.sleep(poll_interval)
                await self.refresh()
        finally:
            bar.close()
        self._check_final()
        return self

    async def scores(self) -> np.ndarray:
        return await self._client.scores(self.id)

    async def cancel(self) -> AsyncQueryHandle:
        self.query = await self._client.cancel_query(self.id)
        return self

    def __repr__(self) -> str:
        return f"AsyncQueryHandle(id={self.id!r}, status={self.status!r}, progress={self.query.progress:.2f})"


