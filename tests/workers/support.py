"""Helpers shared by the worker tests: a tiny trained classifier and shard writers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session
from torch import nn

from loading import dataset_sha256, inspect_model, inspect_shard
from service.db.models import Dataset, Model, Shard
from tests.workers.architectures import NUM_CLASSES, NUM_FEATURES, tiny_mlp


@dataclass(frozen=True)
class Toy:
    module: nn.Module
    x: np.ndarray  # [N, F] float32
    y: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=8)
def toy_problem(n: int = 60, seed: int = 0) -> Toy:
    """Three Gaussian blobs in 6-d and `tiny_mlp` trained on them by full-batch Adam (cached; read-only)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(NUM_CLASSES, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, size=n + 8)
    x = (centers[y] + rng.normal(size=(n + 8, NUM_FEATURES))).astype(np.float32)
    torch.manual_seed(seed)
    module = tiny_mlp()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    inputs, targets = torch.from_numpy(x[:n]), torch.from_numpy(y[:n])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread avoids OpenMP overhead on a busy machine
    try:
        for _ in range(100):
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return Toy(module.eval(), x[:n], y[:n].astype(np.int64), x[n:], y[n:].astype(np.int64))


def write_npz_shards(root: Path, x: np.ndarray, y: np.ndarray, sizes: list[int], *, prefix: str = "train",
                     compressed: bool = False) -> list[Path]:
    """Split rows into consecutive `.npz` shards of the given sizes, with string ids `r<global index>`."""
    paths, start = [], 0
    for position, size in enumerate(sizes):
        path = root / f"{prefix}-{position:03d}.npz"
        ids = np.array([f"r{i}" for i in range(start, start + size)])
        save = np.savez_compressed if compressed else np.savez
        save(path, x=x[start:start + size], y=y[start:start + size], ids=ids)
        paths.append(path)
        start += size
    return paths


def register_model(session: Session, tenant: str, path: Path, *, fmt: str = "auto", task: str = "classification",
                   architecture: str | None = None, allowlist: list[str] | None = None) -> Model:
    """Insert a model row the way the API does after `inspect_model`."""
    info = inspect_model(path, fmt, task, architecture=architecture, allowlist=allowlist or [])
    model = Model(tenant=tenant, name=path.name, uri=path.as_uri(), format=info.format, task=task,
                  architecture=architecture, sha256=info.sha256, num_parameters=info.num_parameters)
    session.add(model)
    session.flush()
    return model


def register_dataset(session: Session, tenant: str, paths: list[Path]) -> Dataset:
    """Insert a dataset row with its shards the way the API does after `inspect_shard`."""
    infos = [inspect_shard(p) for p in paths]
    dataset = Dataset(tenant=tenant, name="train", num_samples=sum(i.num_samples for i in infos),
                      sha256=dataset_sha256([i.sha256 for i in infos]))
    offset = 0
    for position, (path, info) in enumerate(zip(paths, infos, strict=True)):
        dataset.shards.append(Shard(position=position, uri=path.as_uri(), format=info.format,
                                    num_samples=info.num_samples, row_offset=offset, sha256=info.sha256))
        offset += info.num_samples
    session.add(dataset)
    session.flush()
    return dataset


def save_torchscript(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path
