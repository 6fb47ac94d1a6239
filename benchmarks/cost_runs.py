"""Measured runs for the cost model: one attribution job per (method, params, size), cold and warm.

Each run happens in a forked child process with one intra-op thread: a blob data set of N
rows (64 features, 10 classes), a tanh MLP of the given hidden widths (P parameters) trained
briefly, then `attribute(...)` once on a fresh artifact store (cold: every artifact computed)
and once more with other query samples on the same store (warm: cached artifacts reused). The
child reports CPU seconds of each (`time.process_time`, robust when other jobs share the
cores; wall seconds beside them) and the peak resident memory the cold job added (`VmHWM`
after `clear_refs` resets it, minus the resident size before the job). `phases` gives the
plan (`service.costs.plan`) the predictions and the fit are built from.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.feature_files import FeatureFiles
from attribution.methods.base import FitContext, MethodParams
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.structure import ModelStructure
from attribution.tasks import ClassificationTask
from benchmarks.speed_common import blobs, mlp, trained_mlp
from service.costs.model import Coefficients, CostEstimate, JobShape, MemorySizes, Phase, estimate
from service.costs.plan import memory_sizes, plan
from service.costs.tracked import tracked_parameters

FEATURES = 64
CLASSES = 10
TASK = "classification"
MAX_PEAK_BYTES = 4 << 30  # the machine is shared: no run may plan to hold more


@dataclass(frozen=True)
class RunSpec:
    """One job to measure: `method` with `params` on N rows, an MLP with `hidden` widths."""

    method: str
    params: dict[str, Any]
    num_rows: int
    hidden: tuple[int, ...]
    num_queries: int = 1
    per_sample: bool = False
    self_influence: bool = False

    @property
    def num_parameters(self) -> int:
        widths = [FEATURES, *self.hidden, CLASSES]
        return sum(a * b + b for a, b in itertools.pairwise(widths))

    @property
    def label(self) -> str:
        shown = ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) or "defaults"
        mode = " self-influence" if self.self_influence else f" per_sample Q={self.num_queries}" if self.per_sample \
            else f" Q={self.num_queries}"
        return f"{self.method}({shown}){mode}"

    def shape(self, params: MethodParams) -> JobShape:
        """The shape the service would plan: P_d from the MLP's structure as registration records it."""
        structure = ModelStructure.of_module(mlp(FEATURES, self.hidden, CLASSES))
        return JobShape(task=TASK, num_rows=self.num_rows,
                        num_queries=0 if self.self_influence else self.num_queries,
                        num_parameters=self.num_parameters, per_sample=self.per_sample,
                        self_influence=self.self_influence,
                        tracked_parameters=tracked_parameters(params, TASK, structure))

    def planned(self) -> tuple[list[Phase], MemorySizes]:
        parsed = parse_params(self.method, self.params)
        shape = self.shape(parsed)
        phases, _ = plan(self.method, parsed, shape)
        return phases, memory_sizes(self.method, parsed, shape, phases)

    def predict(self, coefficients: Coefficients, *, warm: bool) -> CostEstimate:
        phases, memory = self.planned()
        artifacts = {p.artifact for p in phases if p.artifact is not None} if warm else set()
        return estimate(phases, memory, coefficients, warm=artifacts)


@dataclass
class Measured:
    spec: RunSpec
    cold_cpu_s: float
    warm_cpu_s: float
    cold_wall_s: float
    warm_wall_s: float
    peak_bytes: int
    error: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


def _status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(spec: RunSpec, out: Any) -> None:
    try:
        torch.set_num_threads(1)
        n, q = spec.num_rows, max(spec.num_queries, 1)
        x, y = blobs(n + 2 * q, seed=7)
        module = trained_mlp(x, y, hidden=spec.hidden, steps=30, rows=min(n, 2048))
        model = ModelAdapter(module, ClassificationTask())
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        train = TensorTrainingSet(xs[:n], ys[:n])
        first, second = (None, None) if spec.self_influence else (
            Batch(xs[n:n + q], ys[n:n + q]), Batch(xs[n + q:n + 2 * q], ys[n + q:n + 2 * q]))
        with tempfile.TemporaryDirectory(prefix="cost-run-") as tmp:
            context = FitContext(fingerprint="cost-run", store=InMemoryArtifacts(), feature_files=FeatureFiles(Path(tmp)))
            times = []
            for queries in (first, second):
                if not times:
                    before = _status("VmRSS")
                    _reset_peak()
                wall, cpu = time.perf_counter(), time.process_time()
                attribute(model, spec.method, spec.params, train, context, queries=queries,
                          per_sample=spec.per_sample, self_influence=spec.self_influence)
                times.append((time.process_time() - cpu, time.perf_counter() - wall))
                if len(times) == 1:
                    peak = max(_status("VmHWM") - before, 0)
        out.send({"cold_cpu_s": times[0][0], "warm_cpu_s": times[1][0], "cold_wall_s": times[0][1],
                  "warm_wall_s": times[1][1], "peak_bytes": peak})
    except Exception as exc:  # reported, not raised: one failed run must not stop the study
        out.send({"error": f"{exc.__class__.__name__}: {exc}"[:300]})
    finally:
        out.close()


_WARMED: list[bool] = []


def _warm_up_parent() -> None:
    """Run every method once on a tiny problem in this process, so the forked children inherit
    the lazily imported modules (torch's compiler stack alone takes seconds to import) instead of
    each paying for them inside its measured job."""
    if _WARMED:
        return
    x, y = blobs(72, seed=3)
    model = ModelAdapter(trained_mlp(x, y, hidden=(8,), steps=2, rows=64), ClassificationTask())
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    train, query = TensorTrainingSet(xs[:64], ys[:64]), Batch(xs[64:66], ys[64:66])
    with tempfile.TemporaryDirectory(prefix="cost-warm-") as tmp:
        for method, params, _ in CONFIGS:
            context = FitContext(fingerprint="warm-up", store=InMemoryArtifacts(), feature_files=FeatureFiles(Path(tmp)))
            with contextlib.suppress(Exception):
                attribute(model, method, {**params, "batch_size": 16}, train, context, queries=query)
    _WARMED.append(True)


def measure(spec: RunSpec, *, timeout_s: float = 900.0) -> Measured:
    """Run `spec` cold and warm in a forked child (see module docstring)."""
    _warm_up_parent()
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(spec, send), daemon=True)
    child.start()
    send.close()
    result: dict[str, Any] = {"error": "the run timed out"}
    if receive.poll(timeout_s):
        try:
            result = receive.recv()
        except EOFError:
            result = {"error": f"the run's process died (exit code {child.exitcode})"}
    child.join(5)
    if child.is_alive():
        child.kill()
        child.join()
    if "error" in result:
        return Measured(spec, 0.0, 0.0, 0.0, 0.0, 0, error=str(result["error"]))
    return Measured(spec, float(result["cold_cpu_s"]), float(result["warm_cpu_s"]), float(result["cold_wall_s"]),
                    float(result["warm_wall_s"]), int(result["peak_bytes"]))


def grid(configs: Sequence[tuple[str, dict[str, Any], dict[str, Any]]], sizes: Sequence[tuple[int, tuple[int, ...]]],
         *, max_seconds: float, coefficients: Coefficients | None = None) -> list[RunSpec]:
    """Every config at every (N, hidden) size whose cold run is predicted (with `coefficients`,
    default the committed ones) to take at most `max_seconds` of CPU and `MAX_PEAK_BYTES` of
    memory — keeps exact curvature and per-output curvature passes off the large sizes. A config is `(method, params, {num_queries,
    per_sample, self_influence, max_parameters})`."""
    coefficients = coefficients or Coefficients.load()
    specs = []
    for method, params, options in configs:
        for n, hidden in sizes:
            limit = options.get("max_parameters")
            spec = RunSpec(method, params, n, hidden, num_queries=options.get("num_queries", 1),
                           per_sample=options.get("per_sample", False),
                           self_influence=options.get("self_influence", False))
            if limit is not None and spec.num_parameters > limit:
                continue
            cold = spec.predict(coefficients, warm=False)
            if cold.seconds <= max_seconds and cold.peak_memory_bytes <= MAX_PEAK_BYTES:
                specs.append(spec)
    return specs


def cpu_note() -> str:
    return (f"CPU seconds of the job's process (`time.process_time`), one intra-op thread, "
            f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# (method, params, options): the settings the fit and the benchmark both measure.
CONFIGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("forward_inf", {}, {}),
    ("forward_inf", {"normalize": "none", "optimizer": "sgd", "steps": 1, "lr": 0.01}, {}),
    ("forward_inf", {"normalize": "none", "optimizer": "sgd", "steps": 20, "lr": 0.01}, {"num_queries": 8}),
    ("forward_inf", {}, {"num_queries": 4, "per_sample": True}),
    ("forward_inf", {"self_influence_mode": "gradient_norm"}, {"self_influence": True}),
    ("influence", {"ihvp": "cg", "cg_max_iter": 10, "normalize": "none"}, {}),
    ("influence", {"ihvp": "ekfac"}, {}),
    ("influence", {"ihvp": "exact", "normalize": "none"}, {"max_parameters": 3000}),
    ("influence", {"ihvp": "lissa", "lissa_depth": 50, "normalize": "none"}, {}),
    ("tracin", {}, {}),
    ("tracin", {"projection_dim": 256, "normalize": "none"}, {}),
    ("trak", {"projection_dim": 256}, {}),
    ("gradient_similarity", {}, {"num_queries": 4}),
    ("trackstar", {"projection_dim": 256}, {}),
    ("integrated_influence", {"ihvp": "ekfac", "steps": 2}, {}),
]
