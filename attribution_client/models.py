"""Typed results of the v1 REST API, as the client sees them.

These mirror the server's response schemas (`ModelOut`, `DatasetOut`, `QueryOut`, ... in its
`/openapi.json`; `tests/client/test_schema_contract.py` checks every field against it) but are
written for readers of the API, not imported from the server: the client installs and runs
without the service's dependencies. Unknown fields the server adds later are kept
(`extra="allow"`), so a newer server never breaks an older client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

QueryStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
FINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "canceled")


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Model(ApiModel):
    """A registered model (`POST /v1/models`)."""

    id: str
    name: str
    uri: str
    format: str
    task: str
    sha256: str
    num_parameters: int
    created_at: datetime


class Shard(ApiModel):
    uri: str
    format: str
    num_samples: int
    row_offset: int
    sha256: str


class Dataset(ApiModel):
    """A registered training set (`POST /v1/datasets`): its shards in global row order."""

    id: str
    name: str
    num_samples: int
    sha256: str
    shards: list[Shard]
    created_at: datetime


class RankedRow(ApiModel):
    """One ranked training row (or group): `index` is its global row index across the shards.
    `preview` (first ~200 characters of a text row) is present on servers that send it;
    `stability`, `rank_low`, `rank_high` (rank stability) when the query asked for
    `stability={"resamples": R}`."""

    rank: int
    index: int
    sample_id: str | None
    shard: int
    score: float
    preview: str | None = None
    stability: float | None = None
    rank_low: int | None = None
    rank_high: int | None = None


class SampleResult(ApiModel):
    sample: int
    top: list[RankedRow]
    bottom: list[RankedRow]


class Worker(ApiModel):
    host: str
    pid: int
    device: str
    torch: str
    python: str


class CodeVersion(ApiModel):
    version: str
    commit: str | None


class Provenance(ApiModel):
    """What produced a result: model/dataset hashes, resolved params, code, worker, timings."""

    model: dict[str, Any]
    dataset: dict[str, Any]
    method: str
    params: dict[str, Any]
    code: CodeVersion
    worker: Worker
    num_parts: int
    timings: dict[str, float]


class QueryResult(ApiModel):
    top: list[RankedRow]
    bottom: list[RankedRow]
    num_scored: int | None
    timings: dict[str, Any]
    params: dict[str, Any]
    extras: dict[str, Any]
    scores_shape: list[int] | None
    per_sample: list[SampleResult] | None
    provenance: Provenance | None = None


class Query(ApiModel):
    """An attribution query (`GET /v1/queries/{id}`); `result` once it succeeded."""

    id: str
    status: QueryStatus
    progress: float
    method: str
    cached: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: QueryResult | None
    model_id: str
    dataset_id: str
    mode: str
    self_influence: bool
    top_k: int
    params: dict[str, Any]
    auto: dict[str, Any] | None = None  # `method: "auto"`: {"method", "params", "reason"} of the choice

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


# The server's component schema each client model mirrors (checked against /openapi.json).
SERVER_SCHEMAS: dict[type[ApiModel], str] = {
    Model: "ModelOut", Shard: "ShardOut", Dataset: "DatasetOut", RankedRow: "RankedRow",
    SampleResult: "SampleResult", QueryResult: "QueryResultOut", Query: "QueryOut",
    Provenance: "ProvenanceOut", Worker: "WorkerOut", CodeVersion: "CodeOut",
}
