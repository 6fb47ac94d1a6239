"""One `Settings` object for the API and the workers, read from the environment.

Names in API.md's "Running" section (`DATABASE_URL`, `REDIS_URL`, `DATA_ROOT`,
`API_KEYS`) are part of the public contract; the rest are additions with safe defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_DIR_NAME = ".service"  # under DATA_ROOT: embedded DB, score files; never user-addressable


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    database_url: str | None = Field(default=None, description="unset: SQLite under DATA_ROOT")
    redis_url: str | None = Field(default=None, description="unset: in-process worker")
    data_root: Path = Field(default=Path("./data"), description="the only directory file:// URIs may point into")
    api_keys: str | None = Field(default=None, description="key1:tenant1,key2:tenant2; unset: auth off (loopback only)")
    api_processes: int = Field(default=1, ge=1,
                               description="processes of `python -m service`; > 1 needs DATABASE_URL and REDIS_URL")

    queue_name: str = "attribution"
    job_timeout_s: int = Field(default=3600, ge=1, description="wall-clock limit of one job; beyond it the job "
                               "stops at its next cancellation check and the query fails")
    job_retries: int = 1
    transient_retries: int = Field(default=6, ge=0, le=20, description="retries of a job step after a transient "
                                   "database/Redis error (backoff 0.5, 1, 2, 4, 8, 8, ... s)")
    fanout_rows: int = Field(default=200_000, description="datasets with more rows are split into parts, one RQ job each")
    artifact_ttl_s: int = Field(default=7 * 24 * 3600, description="TTL of cached losses and fit artifacts in Redis")
    cost_coefficients: Path | None = Field(
        default=None, description="JSON of fitted cost coefficients for `?dry_run=true` estimates (written by "
        "`python -m benchmarks.cost_fit` on the workers' hardware); unset: the committed service/costs/coefficients.json")
    inprocess_workers: int = 1
    # A running job renews its lease every third of this; a `running` query whose lease
    # expired belongs to a dead worker and is re-enqueued or failed by the reaper.
    worker_lease_ttl_s: int = Field(default=30, ge=2)
    reaper_interval_s: int = Field(default=30, ge=1, description="how often `python -m workers` looks for lost jobs")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["none", "bf16", "fp16"] = "none"
    sweep_batch_size: int = 1024
    # Text batches hold at most this many padded tokens (rows × longest row), whatever a
    # method's `batch_size`: memory of LM passes grows with tokens, not rows.
    token_budget: int = Field(default=16_384, ge=1)
    # A worker running a joint forward_inf query also claims up to this many − 1 queued ones
    # with the same model, dataset and sweep params and sweeps the data once for all
    # (`workers.batching`); 1 turns batching off.
    batch_max_queries: int = Field(default=16, ge=1, le=256)

    max_request_bytes: int = 32 * 1024 * 1024
    # Longer than the idle timeout of common client pools (httpx 5 s, requests/urllib3 none,
    # browsers and load balancers ~60 s): the server never closes an idle keep-alive connection
    # under a client that is about to send on it.
    keep_alive_timeout_s: int = Field(default=75, ge=1, le=3600)
    max_query_samples: int = 4096
    max_top_k: int = 10_000
    max_model_bytes: int = 4 * 1024**3
    # Entry points "package.module:callable" allowed to build architectures for
    # `format: safetensors` models; empty means that format is refused.
    allowed_architectures: str = ""

    @field_validator("data_root")
    @classmethod
    def _absolute_root(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # --------------------------------------------------------------- derived
    @property
    def service_dir(self) -> Path:
        return self.data_root / SERVICE_DIR_NAME

    @property
    def scores_dir(self) -> Path:
        return self.service_dir / "scores"

    @property
    def features_dir(self) -> Path:
        """Fitted training features as files (`attribution.feature_files`); shared by every
        worker, like the score files (workers on several machines share DATA_ROOT)."""
        return self.service_dir / "features"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.service_dir / 'attribution.db'}"

    @property
    def embedded(self) -> bool:
        """True when jobs run inside the API process (no Redis configured)."""
        return not self.redis_url

    @property
    def tenants_by_key(self) -> dict[str, str]:
        """`{api_key: tenant}` parsed from `API_KEYS`; empty means auth is off."""
        out: dict[str, str] = {}
        for pair in (self.api_keys or "").split(","):
            pair = pair.strip()
            if not pair:
                continue
            key, sep, tenant = pair.partition(":")
            if not sep or not key.strip() or not tenant.strip():
                raise ValueError("API_KEYS must look like key1:tenant1,key2:tenant2")
            out[key.strip()] = tenant.strip()
        return out

    @property
    def architecture_allowlist(self) -> list[str]:
        return [a.strip() for a in self.allowed_architectures.split(",") if a.strip()]


@lru_cache
def _environment_settings() -> Settings:
    return Settings()


class _SettingsSource:
    """`get_settings()`: the settings in force in the current context.

    Normally the environment's (read once and cached; `get_settings.cache_clear()` re-reads
    it). Inside `settings_override(s)` — the embedded in-process job runner wraps each job
    in one with the API's settings — it is `s`, so a job of an app built with
    `create_app(Settings(...))` uses that app's database and data root, not the environment's.
    """

    def __init__(self) -> None:
        self.active: ContextVar[Settings | None] = ContextVar("active_settings", default=None)

    def __call__(self) -> Settings:
        active = self.active.get()
        return active if active is not None else _environment_settings()

    def cache_clear(self) -> None:
        _environment_settings.cache_clear()


get_settings = _SettingsSource()


@contextmanager
def settings_override(settings: Settings) -> Iterator[None]:
    """Make `get_settings()` return `settings` in this context (this thread) until exit."""
    token = get_settings.active.set(settings)
    try:
        yield
    finally:
        get_settings.active.reset(token)
