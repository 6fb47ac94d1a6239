"""Pydantic request and response models of the v1 REST API, separate from the ORM classes.

Request bodies forbid unknown top-level fields (`422 invalid_input`, "<field>: unknown
field"), so a typo such as `topk` is reported instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from attribution.methods.auto import auto_record
from service.db.models import Query, QueryStatus
from service.db.repositories.queries import RankedRow, ranked_rows


def storable_text(value: str) -> str:
    """Refuse strings the database cannot store (NUL characters, lone UTF-16 surrogates)."""
    if "\x00" in value:
        raise PydanticCustomError("unstorable_text", "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("unstorable_text", "must be valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(storable_text)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(storable_text)]
Uri = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(storable_text)]
ResourceRef = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(storable_text)]

ModelFormat = Literal["torchscript", "hf", "safetensors", "auto"]
TaskName = Literal["classification", "regression", "causal_lm"]
QueryMode = Literal["joint", "per_sample"]
GroupBy = Literal["row", "shard", "group"]
GroupReduce = Literal["mean", "sum"]
ItemT = TypeVar("ItemT")


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ------------------------------------------------------------------ models
class ModelCreate(RequestBody):
    name: Name
    uri: Uri = Field(description="file:// URI inside the server's DATA_ROOT")
    format: ModelFormat = "auto"
    task: TaskName
    architecture: Annotated[str, Field(max_length=512), AfterValidator(storable_text)] | None = Field(
        default=None, description="entry point `package.module:callable` (format safetensors; must be allowlisted)"
    )


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: str
    name: str
    uri: str
    format: str
    task: str
    architecture: str | None
    sha256: str
    num_parameters: int
    created_at: datetime


# ------------------------------------------------------------------ datasets
class ShardIn(RequestBody):
    uri: Uri


class DatasetCreate(RequestBody):
    name: Name
    shards: list[ShardIn] = Field(min_length=1, max_length=10_000)


class ShardOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    uri: str
    format: str
    num_samples: int
    row_offset: int = Field(description="global index of the shard's first row")
    sha256: str


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    num_samples: int
    sha256: str = Field(description="hash of the ordered shard hashes")
    shards: list[ShardOut]
    created_at: datetime


# ------------------------------------------------------------------ queries
class StabilityIn(RequestBody):
    """Opt-in rank stability of the ranked rows (`attribution.stability`)."""

    resamples: int = Field(default=16, description="R, the resampled reruns (2 to 32): projection seeds, a "
                                                   "bootstrap over checkpoints, step sizes or dampings by method")


class QueryCreate(RequestBody):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: ResourceRef
    dataset_id: ResourceRef
    method: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(storable_text)] = Field(
        default="auto",
        description="a method name, or `auto` (the default): the service picks the method and params for the "
                    "model's task, the purpose (`self_influence`) and the checkpoints given "
                    "(`params.checkpoint_model_ids`); the query's `method`/`params` then show the choice and "
                    "`auto` (and `result.extras.auto`) why",
    )
    samples: dict[str, Any] | None = Field(
        default=None,
        description='{"x": [...], "y": [...]} | {"text": [...]} | {"refs": [{"dataset_id", "index"}]}',
    )
    self_influence: bool = False
    top_k: int = Field(default=10, ge=1, description="at most the server's MAX_TOP_K")
    mode: QueryMode = "joint"
    params: dict[str, Any] | None = None
    callback_url: Annotated[str, Field(max_length=2048), AfterValidator(storable_text)] | None = None
    group_by: GroupBy = Field(
        default="row",
        description="`row`: one score per training row; `shard`: one per shard (group index = shard position); "
                    "`group`: one per value of the shards' `group` column (every shard needs one), groups ordered "
                    "by id (numerically when every id is an integer, else as text)",
    )
    group_reduce: GroupReduce = Field(
        default="mean", description="how a group's row scores combine: `mean` (per-row support) or `sum` "
                                    "(total); ignored when group_by is `row`",
    )
    stability: StabilityIn | None = Field(
        default=None, description='{"resamples": R}: report each ranked row\'s rank stability (the share of R '
                                  "resamples keeping it in the top/bottom k, and its 5th–95th percentile rank); "
                                  "null: not computed. 422 for methods and params with nothing to resample",
    )


class SampleResult(BaseModel):
    sample: int = Field(description="position of the query sample in the request")
    top: list[RankedRow]
    bottom: list[RankedRow]


class WorkerOut(BaseModel):
    host: str
    pid: int
    device: str = Field(description="where the sweep ran: cpu, cuda, cuda:0, ...")
    torch: str
    python: str


class CodeOut(BaseModel):
    version: str = Field(description="the attribution-service package version")
    commit: str | None = Field(description="source commit (SOURCE_COMMIT or git), when known")


class ProvenanceOut(BaseModel):
    """What produced a result, recorded once by the worker that stored it (cached answers show
    the computing query's record)."""

    model_config = ConfigDict(protected_namespaces=())

    model: dict[str, Any] = Field(description="id, sha256, format, task, num_parameters of the model read")
    dataset: dict[str, Any] = Field(description="id, sha256 (of the ordered shard hashes), num_samples")
    method: str
    params: dict[str, Any] = Field(description="resolved parameters, defaults filled in")
    mode: str
    group_by: str
    top_k: int
    self_influence: bool
    code: CodeOut
    worker: WorkerOut = Field(description="the worker that stored the result (for fanned-out queries: merged it)")
    num_parts: int = Field(description="part jobs the dataset was scored in (1: one job)")
    timings: dict[str, float] = Field(description="seconds per phase")


class QueryResultOut(BaseModel):
    top: list[RankedRow]
    bottom: list[RankedRow]
    num_scored: int | None
    timings: dict[str, Any]
    params: dict[str, Any] = Field(description="method parameters used, defaults filled in")
    extras: dict[str, Any] = Field(description="values the method reported (auto-tuned settings, ...)")
    scores_shape: list[int] | None = Field(
        description="[N] (joint) or [Q, N] (per_sample) of /scores; grouped queries [G] or [Q, G]")
    per_sample: list[SampleResult] | None = Field(
        description="per_sample mode: one ranking per query sample; `top`/`bottom` repeat sample 0"
    )
    provenance: ProvenanceOut | None = Field(
        default=None, description="what produced the result; null for results stored before it was recorded")


class QueryOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: QueryStatus
    progress: float
    method: str
    cached: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: QueryResultOut | None
    model_id: str
    dataset_id: str
    mode: str
    self_influence: bool
    top_k: int
    group_by: str = Field(description="row | shard | group: what one score column stands for")
    group_reduce: str = Field(description="mean | sum: how a group's row scores combine (grouped queries)")
    params: dict[str, Any]
    auto: dict[str, Any] | None = Field(
        default=None, description='`method: "auto"` requests: {"method", "params", "reason"} of the choice '
                                  "(`method`/`params` above show the same); null when a method was named")
    stability: dict[str, Any] | None = Field(default=None, description='the rank-stability request {"resamples": R}, '
                                                                       "or null")
    num_query_samples: int
    source_query_id: str | None = Field(description="cached answers: the query that computed the result")
    callback_url: str | None


# ------------------------------------------------------------------ pages
class Page(BaseModel, Generic[ItemT]):
    """Offset pagination: pass `next_offset` back as `offset`; null means the last page."""

    items: list[ItemT]
    limit: int
    offset: int
    next_offset: int | None


def page_of(rows: list[ItemT], *, limit: int, offset: int) -> Page[ItemT]:
    """A page from up to `limit + 1` fetched rows (the extra row only tells that more exist)."""
    more = len(rows) > limit
    return Page[ItemT](items=rows[:limit], limit=limit, offset=offset, next_offset=offset + limit if more else None)


# ------------------------------------------------------------------ ORM -> response
def query_out(query: Query, *, with_result: bool = True, results: Sequence[RankedRow] | None = None) -> QueryOut:
    """The GET body of a query; `result` only once it succeeded (and `with_result`).

    `results`: its ranked rows ordered by kind, sample and rank, when the caller has them
    already (default: `query.results`, loaded from the database).
    """
    result = None
    if with_result and query.status == QueryStatus.SUCCEEDED.value:
        result = _result_out(query, ranked_rows(query) if results is None else results)
    return QueryOut(
        id=query.id, status=QueryStatus(query.status), progress=query.progress, method=query.method,
        cached=query.cached, created_at=query.created_at, started_at=query.started_at,
        finished_at=query.finished_at, error=query.error, result=result, model_id=query.model_id,
        dataset_id=query.dataset_id, mode=query.mode, self_influence=query.self_influence,
        top_k=query.top_k, group_by=query.group_by, group_reduce=query.group_reduce,
        params=query.params, auto=auto_record(query.extras), stability=query.stability,
        num_query_samples=query.num_query_samples,
        source_query_id=query.source_query_id, callback_url=query.callback_url,
    )


def _result_out(query: Query, ranked: Sequence[RankedRow]) -> QueryResultOut:
    rankings: dict[int, dict[str, list[RankedRow]]] = {}
    for row in ranked:  # ordered by (kind, rank)
        ranking = rankings.setdefault(row.sample, {"top": [], "bottom": []})
        ranking.setdefault(row.kind, []).append(row)
    samples = sorted(rankings)
    first = rankings[samples[0]] if samples else {"top": [], "bottom": []}
    per_sample = None
    if query.mode == "per_sample" and not query.self_influence:
        per_sample = [SampleResult(sample=s, top=rankings[s]["top"], bottom=rankings[s]["bottom"]) for s in samples]
    stored = query.scores_shape or {}
    shape = stored.get("shape") if isinstance(stored, dict) else stored
    return QueryResultOut(
        top=first["top"], bottom=first["bottom"], num_scored=query.num_scored, timings=query.timings or {},
        params=query.params, extras=query.extras or {}, per_sample=per_sample,
        scores_shape=[int(n) for n in shape] if isinstance(shape, list) else None,
        provenance=ProvenanceOut.model_validate(query.provenance) if query.provenance else None,
    )
