"""Response model of `POST /v1/queries?dry_run=true`: the predicted cost of a query."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class PhaseOut(BaseModel):
    name: str = Field(description="the part of the job, e.g. base_losses, unlearning, sweep, ihvp_fit")
    kind: str = Field(description="forward | gradient | curvature | step | projection | dense | eigen | product")
    rows: int = Field(description="rows the phase touches")
    passes: int = Field(description="times it touches each of them")
    rows_x_passes: int
    artifact: str | None = Field(description="the cached artifact this phase builds (null: paid by every query)")
    warm: bool = Field(description="true when that artifact is already cached: the phase costs nothing now")


class QueryEstimate(BaseModel):
    """What the query would cost if submitted now. Nothing was stored or enqueued."""

    model_config = ConfigDict(protected_namespaces=())

    dry_run: Literal[True] = True
    method: str
    params: dict[str, Any] = Field(description="the params with every default filled in, as the query would store them")
    mode: str
    self_influence: bool
    num_rows: int = Field(description="N, training rows scored")
    num_query_samples: int = Field(description="Q, query samples (0 for self_influence)")
    num_parameters: int = Field(description="P, the model's trainable parameters")
    num_parameters_differentiated: int = Field(
        description="P_d, the parameters the job's gradients, curvature and projections cover: those of the "
                    "layers it tracks (`layers`; TracIn's `last_layer`, its default on classifiers), else P")
    predicted_seconds: float = Field(description="predicted compute seconds with the cache as it stands now "
                                                 "(0 when an identical query's result is stored, or the "
                                                 "Idempotency-Key already names this request's query)")
    predicted_seconds_cold: float = Field(description="predicted compute seconds with nothing cached")
    peak_memory_bytes: int = Field(description="predicted peak memory the job adds to an idle worker")
    rows_x_passes: int = Field(description="rows × passes of the phases still to run (warm phases excluded)")
    rows_x_passes_cold: int = Field(description="rows × passes of every phase")
    cache: Literal["warm", "partial", "cold", "none"] = Field(
        description="warm: every cacheable part is cached; partial: some; cold: none; none: the method caches nothing")
    warm: dict[str, bool] = Field(description="each cacheable artifact of the job and whether it is cached now")
    result_cached: bool = Field(description="an identical succeeded query exists: a real POST answers at once")
    passes: list[PhaseOut]
    notes: list[str] = Field(default_factory=list)
    coefficients: dict[str, Any] = Field(description="where the cost coefficients were measured (refit per machine)")
