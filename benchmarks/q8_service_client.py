"""Q8 over HTTP: register the study's folders with a running service and fetch score matrices.

`StudyClient` wraps an `httpx.Client` on `python -m service`: `register` POSTs the model, its
TracIn checkpoints (as models of the same architecture) and the jsonl dataset; `scores`
POSTs one `per_sample` query of prompt/completion samples, waits for it, and reads the full
`[Q, N]` score matrix from `GET /v1/queries/{id}/scores?format=npy`, with the result's
`extras` and `timings`.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import Tensor

CHECKPOINTS = "checkpoints"  # placeholder in a method's params: the registered TracIn checkpoints


@dataclass(frozen=True)
class Scored:
    scores: Tensor  # [Q, N] float32
    extras: dict[str, Any]
    timings: dict[str, float]
    seconds: float  # POST to final status
    cached: bool  # answered from the service's stored results (an identical earlier query)


class StudyClient:
    def __init__(self, client: httpx.Client, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.model_id = ""
        self.dataset_id = ""
        self.checkpoint_ids: list[str] = []
        self.checkpoint_lrs: list[float] = []

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(path, json=body)
        if response.status_code >= 300:
            raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text[:300]}")
        out: dict[str, Any] = response.json()
        return out

    def register(self, folders: dict[str, Any]) -> None:
        """The model, its checkpoints and the dataset (paths from `lm_folder.save_study_folders`)."""

        def model(path: Path, name: str) -> str:
            return str(self._post("/v1/models", {"name": name, "uri": path.resolve().as_uri(), "format": "hf",
                                                 "task": "causal_lm"})["id"])

        self.model_id = model(folders["model"], "q8-gpt2")
        self.checkpoint_ids = [model(p, f"q8-gpt2-checkpoint-{c}") for c, p in enumerate(folders["checkpoints"])]
        self.checkpoint_lrs = list(folders["checkpoint_lrs"])
        self.dataset_id = str(self._post("/v1/datasets", {
            "name": "q8-facts", "shards": [{"uri": p.resolve().as_uri()} for p in folders["shards"]]})["id"])

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with the `CHECKPOINTS` placeholder replaced by the registered checkpoints."""
        out = {k: v for k, v in params.items() if k != CHECKPOINTS}
        if params.get(CHECKPOINTS):
            out.update(checkpoint_model_ids=self.checkpoint_ids, checkpoint_lrs=self.checkpoint_lrs)
        return out

    def scores(self, method: str, params: dict[str, Any], samples: dict[str, list[str]]) -> Scored:
        """`[Q, N]` scores of a per-sample query (raises with the query's error if it failed)."""
        started = time.perf_counter()
        body = {"model_id": self.model_id, "dataset_id": self.dataset_id, "method": method, "mode": "per_sample",
                "samples": samples, "top_k": 10, "params": self.resolve(params)}
        query_id = self._post("/v1/queries", body)["id"]
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.client.get(f"/v1/queries/{query_id}").json()
            if state["status"] in ("succeeded", "failed", "canceled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {params}: not final after {self.timeout:.0f} s")
            time.sleep(0.2)
        if state["status"] != "succeeded":
            raise RuntimeError(f"{method} {params}: {state['status']}: {state.get('error')}")
        seconds = time.perf_counter() - started
        raw = self.client.get(f"/v1/queries/{query_id}/scores", params={"format": "npy"})
        raw.raise_for_status()
        matrix = torch.from_numpy(np.load(io.BytesIO(raw.content))).float().reshape(len(samples["prompt"]), -1)
        result = state.get("result") or {}
        return Scored(matrix, dict(result.get("extras") or {}), dict(result.get("timings") or {}), seconds,
                      bool(state.get("cached")))
