"""The provenance record written once with each computed result: what produced it.

`{"model": {id, sha256, format, task, num_parameters}, "dataset": {id, sha256, num_samples},
"method", "params" (resolved, defaults filled in), "mode", "group_by", "top_k",
"self_influence", "code": {version, commit}, "worker": {host, pid, device, torch, python},
"num_parts", "timings" (seconds per phase)}`. Model and shard files are re-hashed when a
worker loads them, so the hashes recorded are those of the files that were read. A fanned-out
query records the worker that merged its parts (`num_parts` > 1).
"""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

import torch

from attribution.device import resolve_device
from service.db.models import Dataset, Model, Query
from service.settings import Settings
from service.version import package_version, source_commit


def worker_info(settings: Settings) -> dict[str, Any]:
    """This process: host name, pid, the device its sweeps run on, torch and Python versions."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(resolve_device(settings.device)),
            "torch": torch.__version__, "python": platform.python_version()}


def provenance_record(query: Query, model: Model, dataset: Dataset, settings: Settings,
                      timings: dict[str, float]) -> dict[str, Any]:
    return {
        "model": {"id": model.id, "sha256": model.sha256, "format": model.format, "task": model.task,
                  "num_parameters": int(model.num_parameters)},
        "dataset": {"id": dataset.id, "sha256": dataset.sha256, "num_samples": int(dataset.num_samples)},
        "method": query.method, "params": query.params, "mode": query.mode, "group_by": query.group_by,
        "top_k": int(query.top_k), "self_influence": bool(query.self_influence),
        "code": {"version": package_version(), "commit": source_commit()},
        "worker": worker_info(settings), "num_parts": int(query.num_parts or 1),
        "timings": {k: float(v) for k, v in timings.items()},
    }
