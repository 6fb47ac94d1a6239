"""Predicted cost of one attribution job before it runs: rows × passes per phase, seconds, memory.

A job is a list of `Phase`s (`service.costs.plan.plan`): each touches `rows` rows `passes` times
with one kind of work whose per-row size is `width`,

    units(phase) = rows · passes · width,

e.g. a forward sweep of N rows through a P-parameter model is `FORWARD` with width P, a
per-sample gradient pass `GRADIENT` with width P_d (the parameters differentiated: P, or fewer
when the method tracks some layers, `JobShape.differentiated`), a random projection
`PROJECTION` with width P_d·k, a dense curvature accumulation `DENSE` with width P_d², an
eigendecomposition `EIGEN` with rows = 1 and width P_d³, reading a cached artifact `READ` with
width its bytes. The predicted CPU seconds are linear in the units,

    seconds = overhead + Σ_phases c[kind] · units + c_batch · batches + c_sample · sample_rows,

where `sample_rows` counts the rows × passes of per-sample gradient phases (`GRADIENT`,
`DIRECTION`): a per-sample gradient pays a fixed cost per row (the vmapped forward through the
whole model and the per-chunk call) besides its P_d-proportional part, which dominates when
only the last layer is differentiated.

with coefficients `c` fitted from measured runs (`benchmarks/cost_fit.py`, stored as
`coefficients.json` beside this module; refit per machine/GPU). A phase that produces a
cached artifact (`Phase.artifact`: base losses, curvature fits, TRAK / TrackStar features,
self-influence norms) costs nothing when that artifact already exists (`warm`), so an
estimate has a cold and a warm total and says which parts are warm.

Peak memory is the bytes a job adds above the idle worker, linear in a few sizes
(`MemorySizes`: the parameters, the `[Q, N]` score matrix and cached `[N]` vectors, a batch of
per-sample gradients `[B, P]` and one of curvature pseudo-gradients, in-memory features `[N, k]`, dense `[P, P]` curvature and
Krylov bases), with fitted coefficients too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

COEFFICIENTS_FILE = Path(__file__).with_name("coefficients.json")


class PassKind(StrEnum):
    """The kinds of work a phase does; one fitted seconds-per-unit coefficient each."""

    FORWARD = "forward"  # loss of a row under one parameter set: width P
    GRADIENT = "gradient"  # per-sample gradient of a row: width P
    DIRECTION = "direction"  # per-sample gradient as direction × log-scale (`gradient_directions`): width P
    PSEUDO_GRADIENT = "pseudo_gradient"  # a row's curvature factors Σ r rᵀ (one gradient per output): width P
    CURVATURE = "curvature"  # one curvature-vector product of a row (CG, LiSSA, Arnoldi iterations): width P
    KRONECKER = "kronecker"  # a row's K-FAC / EK-FAC layer statistics (batched, every output's backward): width P
    STEP = "step"  # one unlearning step (backward of the query loss + optimizer update): rows = copies, width P
    RANDOM = "random"  # entries of a random projection matrix drawn: rows = 1, width P·k
    PROJECTION = "projection"  # a row's P-vector times a P×k matrix (random projection, factored solves): width P·k
    DENSE = "dense"  # outer-product accumulation of a row: width P² (or k² for TRAK's kernel)
    EIGEN = "eigen"  # eigendecomposition / Cholesky of a d×d matrix: rows = 1, width d³
    PRODUCT = "product"  # feature dot products: width k per (row, query)
    READ = "read"  # bytes of a cached artifact (de)serialised or read: rows = 1, width = bytes


PER_SAMPLE_KINDS = frozenset({PassKind.GRADIENT, PassKind.DIRECTION})


@dataclass(frozen=True)
class Phase:
    """One part of a job. `artifact` names the cached artifact it builds (None: paid by every
    query); `batch_rows` the rows per batch (for the per-batch overhead), 0 for none."""

    name: str
    kind: PassKind
    rows: int
    passes: int
    width: int
    artifact: str | None = None
    batch_rows: int = 0
    warm: bool = False

    @property
    def units(self) -> float:
        return float(self.rows) * float(self.passes) * float(self.width)

    @property
    def rows_x_passes(self) -> int:
        return self.rows * self.passes

    @property
    def sample_rows(self) -> int:
        """Rows × passes of per-sample gradients (`PER_SAMPLE_KINDS`), else 0."""
        return self.rows_x_passes if self.kind in PER_SAMPLE_KINDS else 0

    @property
    def batches(self) -> int:
        if self.batch_rows <= 0 or self.rows <= 0:
            return 0
        return math.ceil(self.rows / self.batch_rows) * self.passes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "rows": self.rows, "passes": self.passes,
                "rows_x_passes": self.rows_x_passes, "width": self.width, "artifact": self.artifact,
                "warm": self.warm}


@dataclass(frozen=True)
class MemorySizes:
    """The sizes peak memory grows with (bytes, before the fitted coefficients)."""

    parameters: int  # P float32 values (each model copy, optimizer state)
    score_rows: int  # [Q, N] float32 scores plus cached [N] vectors
    gradient_batch: int  # a [B, P] float32 per-sample-gradient batch (0: no gradient phase)
    curvature_batch: int  # a [B_fit, P] float32 batch of curvature pseudo-gradients (× outputs; 0: none)
    features: int  # in-memory [N, k] float32 features (TRAK); memory-mapped files are not counted
    dense: int  # float64 d×d matrices (exact curvature, TRAK kernel) and Krylov bases

    def as_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "score_rows": self.score_rows, "gradient_batch": self.gradient_batch,
                "curvature_batch": self.curvature_batch, "features": self.features, "dense": self.dense}


MEMORY_TERMS = ("parameters", "score_rows", "gradient_batch", "curvature_batch", "features", "dense")


@dataclass(frozen=True)
class Coefficients:
    """Fitted coefficients: seconds per unit of each `PassKind`, per batch, per per-sample
    gradient row, per job; bytes per byte of each memory term plus a constant. `source` says
    where and how they were measured."""

    seconds_per_unit: dict[str, float]
    seconds_per_batch: float
    seconds_per_sample_row: float
    overhead_seconds: float
    memory_per_byte: dict[str, float]
    memory_overhead_bytes: float
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = COEFFICIENTS_FILE) -> Coefficients:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Coefficients:
        per_unit = {str(k): float(v) for k, v in dict(data["seconds_per_unit"]).items()}
        missing = [kind.value for kind in PassKind if kind.value not in per_unit]
        if "seconds_per_sample_row" not in data:
            missing.append("seconds_per_sample_row")
        if missing:
            raise ValueError(f"cost coefficients lack {missing} (fitted by an older cost model): refit them "
                             "with python -m benchmarks.cost_fit")
        memory = {str(k): float(v) for k, v in dict(data["memory_per_byte"]).items()}
        if set(memory) != set(MEMORY_TERMS):
            raise ValueError(f"cost coefficients need memory_per_byte for exactly {list(MEMORY_TERMS)}")
        return cls(per_unit, float(data["seconds_per_batch"]), float(data["seconds_per_sample_row"]),
                   float(data["overhead_seconds"]), memory, float(data["memory_overhead_bytes"]),
                   dict(data.get("source", {})))

    def to_dict(self) -> dict[str, Any]:
        return {"seconds_per_unit": self.seconds_per_unit, "seconds_per_batch": self.seconds_per_batch,
                "seconds_per_sample_row": self.seconds_per_sample_row, "overhead_seconds": self.overhead_seconds, "memory_per_byte": self.memory_per_byte,
                "memory_overhead_bytes": self.memory_overhead_bytes, "source": self.source}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class CostEstimate:
    """The prediction for one job: its phases (each marked warm or not), predicted CPU seconds as
    the cache stands (`seconds`) and with nothing cached (`cold_seconds`), peak bytes above the
    idle worker, and rows × passes in total."""

    phases: tuple[Phase, ...]
    seconds: float
    cold_seconds: float
    peak_memory_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def rows_x_passes(self) -> int:
        return sum(p.rows_x_passes for p in self.phases if not p.warm)

    @property
    def cold_rows_x_passes(self) -> int:
        return sum(p.rows_x_passes for p in self.phases)

    @property
    def artifacts(self) -> dict[str, bool]:
        """`{artifact: warm}` of every cacheable part of the job."""
        out: dict[str, bool] = {}
        for phase in self.phases:
            if phase.artifact is not None:
                out[phase.artifact] = out.get(phase.artifact, True) and phase.warm
        return out


@dataclass(frozen=True)
class JobShape:
    """What the cost depends on besides the method's params."""

    task: str  # classification | regression | causal_lm
    num_rows: int  # N training rows scored
    num_queries: int  # Q query samples (0 for self-influence)
    num_parameters: int  # P trainable parameters of the model
    per_sample: bool = False
    self_influence: bool = False
    kfac_supported: bool = True  # every tracked parameter is in a layer K-FAC factors
    tracked_parameters: int | None = None  # P_d the method differentiates (`service.costs.tracked`); None: P

    @property
    def differentiated(self) -> int:
        """P_d: the parameters gradients, curvature and projections cover (P when not restricted)."""
        return self.tracked_parameters if self.tracked_parameters is not None else self.num_parameters


def read_phase(name: str, size: int) -> Phase:
    """Serialising or reading `size` bytes of a cached artifact (paid cold and warm)."""
    return Phase(name, PassKind.READ, 1, 1, max(int(size), 1))


def phase_seconds(phase: Phase, coefficients: Coefficients) -> float:
    return (coefficients.seconds_per_unit[phase.kind.value] * phase.units
            + coefficients.seconds_per_batch * phase.batches + coefficients.seconds_per_sample_row * phase.sample_rows)


def estimate(phases: Iterable[Phase], memory: MemorySizes, coefficients: Coefficients,
             warm: Iterable[str] = (), notes: Iterable[str] = ()) -> CostEstimate:
    """Seconds (as cached now and cold) and peak bytes of a job's `phases`; the phases whose
    artifact is in `warm` are marked warm and cost nothing in `seconds`."""
    warm_set = set(warm)
    marked = tuple(replace(p, warm=p.artifact is not None and p.artifact in warm_set) for p in phases)
    cold = coefficients.overhead_seconds + sum(phase_seconds(p, coefficients) for p in marked)
    now = coefficients.overhead_seconds + sum(phase_seconds(p, coefficients) for p in marked if not p.warm)
    peak = coefficients.memory_overhead_bytes + sum(
        coefficients.memory_per_byte[name] * value for name, value in memory.as_dict().items())
    return CostEstimate(marked, now, cold, int(max(peak, 0.0)), tuple(notes))


def design_row(phases: Iterable[Phase]) -> dict[str, float]:
    """The regressors of a run for fitting: units per kind, batches, per-sample gradient rows,
    and 1 (the overhead)."""
    row = {kind.value: 0.0 for kind in PassKind}
    row["batches"] = 0.0
    row["sample_rows"] = 0.0
    row["overhead"] = 1.0
    for phase in phases:
        if phase.warm:
            continue
        row[phase.kind.value] += phase.units
        row["batches"] += phase.batches
        row["sample_rows"] += phase.sample_rows
    return row


def memory_row(memory: MemorySizes) -> dict[str, float]:
    row: dict[str, float] = {name: float(value) for name, value in memory.as_dict().items()}
    row["overhead"] = 1.0
    return row
