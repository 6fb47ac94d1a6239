"""Building blocks of the job tests: a registered toy problem, query rows, an in-process RQ worker."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from redis import Redis
from rq import Queue, SimpleWorker

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from service.db.models import Query, QueryStatus
from service.db.repositories import jobs as repo
from service.db.session import session_scope
from service.settings import Settings
from tests.workers import support


@dataclass
class Registered:
    toy: support.Toy
    tenant: str
    model_id: str
    dataset_id: str


def register_toy(settings: Settings, *, sizes: tuple[int, ...] = (20, 15, 25), n: int = 60) -> Registered:
    toy = support.toy_problem(n=n)
    root = settings.data_root
    model_path = support.save_torchscript(toy.module, root / "toy.pt")
    shards = support.write_npz_shards(root, toy.x, toy.y, list(sizes))
    tenant = uuid.uuid4().hex
    with session_scope(settings) as session:
        model = support.register_model(session, tenant, model_path)
        dataset = support.register_dataset(session, tenant, shards)
        return Registered(toy, tenant, model.id, dataset.id)


def insert_query(settings: Settings, reg: Registered, *, method: str = "forward_inf", params: dict[str, Any] | None = None,
                 samples: dict[str, Any] | None = None, mode: str = "joint", self_influence: bool = False,
                 top_k: int = 5, callback_url: str | None = None, model_id: str | None = None,
                 stored_extra: dict[str, Any] | None = None) -> str:
    """A `queued` query row; `stored_extra` adds raw entries to the stored params (checkpoint ids)."""
    if samples is None and not self_influence:
        samples = {"x": reg.toy.x_test[:2].tolist(), "y": reg.toy.y_test[:2].tolist()}
    with session_scope(settings) as session:
        query = Query(tenant=reg.tenant, model_id=model_id or reg.model_id, dataset_id=reg.dataset_id, method=method,
                      params={**parse_params(method, params or {}).to_dict(), **(stored_extra or {})}, mode=mode, self_influence=self_influence,
                      top_k=top_k, samples=samples, num_query_samples=len(samples["x"]) if samples else 0,
                      request_hash=uuid.uuid4().hex, callback_url=callback_url)
        session.add(query)
        session.flush()
        return query.id


def fetch(settings: Settings, query_id: str) -> Query:
    with session_scope(settings) as session:
        query = session.get(Query, query_id)
        if query is None:
            raise LookupError(query_id)
        _ = query.results, query.parts  # load while the session is open
        return query


def work(settings: Settings) -> None:
    """Drain the queue with an in-process RQ `SimpleWorker` (burst mode)."""
    connection = Redis.from_url(settings.redis_url or "")
    SimpleWorker([Queue(settings.queue_name, connection=connection)], connection=connection).work(burst=True)


def expected_scores(reg: Registered, method: str, params: dict[str, Any], *, samples: Batch | None,
                    per_sample: bool = False, self_influence: bool = False) -> torch.Tensor:
    """The same attribution computed in memory, without the service: `[Q, N]`."""
    train = TensorTrainingSet(torch.from_numpy(reg.toy.x), torch.from_numpy(reg.toy.y))
    context = FitContext(fingerprint="direct", store=InMemoryArtifacts())
    return attribute(ModelAdapter(reg.toy.module, ClassificationTask()), method, params, train, context,
                     queries=samples, per_sample=per_sample, self_influence=self_influence)


def query_batch(reg: Registered, count: int = 2) -> Batch:
    return Batch(torch.from_numpy(reg.toy.x_test[:count]), torch.from_numpy(reg.toy.y_test[:count]))


def ranking(query: Query, kind: str, sample: int = 0) -> list[tuple[int, float]]:
    rows = sorted((r for r in query.results if r.kind == kind and r.sample == sample), key=lambda r: r.rank)
    return [(r.index, r.score) for r in rows]


def load_scores(settings: Settings, query: Query) -> np.ndarray:
    return np.load(settings.scores_dir / (query.scores_path or ""), allow_pickle=False)


def is_final(settings: Settings, query_id: str) -> bool:
    with session_scope(settings) as session:
        status = repo.query_status(session, query_id)
    return status is not None and QueryStatus(status).is_final


def register_slow_model(settings: Settings, reg: Registered) -> str:
    """The toy weights under the allowlisted `slow_mlp` architecture (0.1 s per forward pass)."""
    from safetensors.torch import save_file

    path = settings.data_root / "slow.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in reg.toy.module.state_dict().items()}, str(path))
    with session_scope(settings) as session:
        return support.register_model(session, reg.tenant, path, fmt="safetensors",
                                      architecture="tests.workers.architectures:slow_mlp",
                                      allowlist=settings.architecture_allowlist).id


def wait_for(condition: Any, timeout: float = 30.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        time.sleep(interval)
