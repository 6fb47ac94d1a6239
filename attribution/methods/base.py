"""The one interface every attribution method implements.

Two phases (TRAK, kronfluence): `fit` computes reusable artifacts once per
(model, dataset, params) and stores them through the `ArtifactStore`; `score` runs per
query and returns a `[Q, N]` score matrix (Q = number of query samples in `per_sample`
mode, 1 in `joint` mode). `self_influence` returns `[N]`.

Sign convention, for every method: a higher score means training row i supports the
query's current prediction — removing it would raise the query loss.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

import torch
from pydantic import ConfigDict, StrictInt, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import to_jsonable_python
from torch import Tensor

from attribution.artifacts import ArtifactStore
from attribution.data import Batch, TrainingSet
from attribution.feature_files import FeatureFiles
from attribution.methods.limits import first_excess
from attribution.model import ModelAdapter
from attribution.optimizer_state import SecondMoment

Progress = Callable[[float], None]


def no_progress(_: float) -> None:
    return None


def stage_progress(progress: Progress, stage: int, num_stages: int) -> Progress:
    """Map a stage's own `[0, 1]` progress onto its slice of the overall `[0, 1]`."""
    return lambda fraction: progress((stage + fraction) / num_stages)


class MethodName(StrEnum):
    FORWARD_INF = "forward_inf"
    INFLUENCE = "influence"
    TRACIN = "tracin"
    TRAK = "trak"
    INTEGRATED_INFLUENCE = "integrated_influence"
    GRADIENT_SIMILARITY = "gradient_similarity"
    TRACKSTAR = "trackstar"


class Normalize(StrEnum):
    NONE = "none"
    RELATIVE = "relative"


class ParamsError(ValueError):
    """Invalid method parameters; `field` names the offending one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"params.{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ContextInputs:
    """What the service must resolve into a `FitContext` before `fit`: registered checkpoint
    models θ_c (`checkpoints`, in order) with their learning rates η_c, and an optimizer-state
    file (`second_moment`)."""

    checkpoint_model_ids: tuple[str, ...] = ()
    checkpoint_lrs: tuple[float, ...] = ()
    optimizer_state: str | None = None


# The pydantic configuration of every params dataclass: unknown keys and non-finite floats are
# refused; fields are declared `StrictInt`/`StrictFloat`/`StrictBool`/`StrictStr`, so "3" is no
# integer, 1.5 no integer, true no number (an integer is a number); enums take their values.
PARAMS_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class MethodParams:
    """Base of every method's parameters: a frozen pydantic dataclass.

    Subclasses (each decorated `@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)`) add fields with
    defaults and check their ranges in `check()` (raising `ParamsError`); every cost-scaling
    field is bounded by `limits.MAXIMUMS` first. `parse` validates a raw JSON object, raising
    `ParamsError` naming the field; `to_dict` is its inverse (the stored, resolved params).
    """

    normalize: Normalize = Normalize.NONE
    batch_size: StrictInt = 512
    seed: StrictInt = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParamsError("batch_size", "must be at least 1")
        excess = first_excess(self)
        if excess is not None:
            name, value, maximum = excess
            raise ParamsError(name, f"must be at most {maximum} (got {value}); the limits are in the README")
        self.check()

    def check(self) -> None:
        """Subclass hook: raise `ParamsError` for out-of-range values."""

    def context_inputs(self) -> ContextInputs:
        """The registered models and files these params name (none by default)."""
        return ContextInputs()

    def for_task(self, task: str) -> Self:
        """These params with the defaults of a model of `task` made explicit in the unset
        fields (so the stored and reported params are what runs); by default unchanged."""
        return self

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Self:
        """The params of a raw JSON object (pydantic validation); raises `ParamsError` naming the
        first invalid field."""
        try:
            return cls(**dict(raw or {}))
        except ValidationError as exc:
            raise params_error(exc, cls, ParamsError) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `parse` reads back (enums as values, tuples as lists)."""
        return dict(to_jsonable_python(self))


def params_error(exc: ValidationError, params_type: type, error_type: Callable[[str, str], ValueError]) -> ValueError:
    """The first error of a pydantic `ValidationError` raised by the dataclass `params_type` as
    `error_type(field, message)` (`checkpoint_lrs[0]` names a list item); an error raised by its
    `__post_init__` (a `ParamsError` naming its field) is returned as raised."""
    error = exc.errors()[0]
    raised = (error.get("ctx") or {}).get("error")
    if isinstance(raised, ValueError):
        return raised
    name, *index = error["loc"] or ("",)
    field = str(name) + "".join(f"[{i}]" for i in index)
    if error["type"] == "unexpected_keyword_argument":
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(params_type)))
        return error_type(field, f"unknown parameter; valid: {valid}")
    return error_type(field, f"{error['msg'][0].lower()}{error['msg'][1:]} (got {error['input']!r})")


@dataclass
class FitContext:
    """What a method needs besides model and params to find and store its artifacts.

    `fingerprint` identifies (model content, dataset content, task); the worker passes
    the registered sha256 values, tests any unique string.
    """

    fingerprint: str
    store: ArtifactStore | None = None
    progress: Progress = no_progress
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # values reported with the result
    # Earlier checkpoints θ_c of the same architecture for multi-checkpoint methods
    # (TracIn, TRAK ensembles), with their learning rates η_c; empty: the final model only.
    checkpoints: list[ModelAdapter] = field(default_factory=list)
    checkpoint_lrs: list[float] = field(default_factory=list)
    # Autocast dtype for forward sweeps on CUDA (bf16/fp16); None: full precision.
    amp_dtype: torch.dtype | None = None
    # Where large fitted arrays (training features [N, d]) live as files; None: a temporary
    # directory per method instance (nothing reused across instances).
    feature_files: FeatureFiles | None = None
    # The optimizer's second moment (Adam exp_avg_sq) the service resolved from
    # `params.optimizer_state`; None: methods that use it estimate it instead.
    second_moment: SecondMoment | None = None


@dataclass
class BatchedScores:
    """One query's share of `AttributionMethod.score_many`: its scores `[1, N]` (before any
    relative normalisation), its own timings and the values reported with its result."""

    scores: Tensor
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class AttributionMethod(ABC):
    """Base class: construct with a model, params and a fit context; then `score`.

    Execution traits — how the service may run a query; workers read only these, never a
    parameter by name:
    - `supports_self_influence`: defines `self_influence` (mislabel audits, relative scores);
    - `row_separable`: row i's score depends on row i alone (given the query), so a query may
      be split over row ranges (`can_fan_out`);
    - `fits_curvature(params)`: `fit` estimates (G + λI)⁻¹ over the whole training set;
    - `batch_key(params)`: queries whose keys are equal (not None) may share one pass over the
      training set (`score_many`).
    """

    name: ClassVar[MethodName]
    params_type: ClassVar[type[MethodParams]]
    supports_self_influence: ClassVar[bool] = True
    row_separable: ClassVar[bool] = False

    @classmethod
    def fits_curvature(cls, params: MethodParams) -> bool:
        """Whether `fit` estimates the curvature (G + λI)⁻¹ over the whole training set."""
        return False

    @classmethod
    def can_fan_out(cls, params: MethodParams, task: str) -> bool:
        """Whether a query may be scored as independent row ranges whose `[Q, n_k]` matrices are
        concatenated: row-separable scores, no whole-set fit, and not relative (RelatIF's floor
        uses the median norm over all rows)."""
        return (cls.row_separable and not cls.fits_curvature(params)
                and params.for_task(task).normalize != Normalize.RELATIVE)

    @classmethod
    def batch_key(cls, params: MethodParams) -> str | None:
        """What two joint queries' params must share to be scored together by `score_many`;
        None: this query is scored alone."""
        return None

    def score_many(self, queries: Sequence[tuple[MethodParams, Batch]], train: TrainingSet) -> list[BatchedScores]:
        """Joint scores of several queries (each its params and samples, all with this instance's
        `batch_key`) in one pass over `train`; methods with a `batch_key` implement it."""
        raise NotImplementedError(f"{self.name} scores one query at a time")

    def __init__(self, model: ModelAdapter, params: MethodParams, context: FitContext) -> None:
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} takes {self.params_type.__name__}")
        self.model = model
        self.params = params
        self.context = context

    def fit(self, train: TrainingSet) -> None:  # noqa: B027 - optional hook
        """Compute (or load from the store) artifacts reused across queries."""

    @abstractmethod
    def score(self, queries: Batch, train: TrainingSet, *, per_sample: bool = False) -> Tensor:
        """`[Q, N]` (per_sample) or `[1, N]` (joint) scores of every training row."""

    def self_influence(self, train: TrainingSet) -> Tensor:
        """`[N]` score of each training row against itself."""
        raise NotImplementedError(f"{self.name} does not define self-influence")

    def relative_norm_squared(self, train: TrainingSet) -> Tensor:
        """`[N]` squared norm ‖u_i‖² of each row in the geometry of its scores.

        RelatIF divides score(q, i) = ⟨u_q, u_i⟩ by ‖u_i‖, so an exact copy of the query
        scores highest by Cauchy–Schwarz. For a symmetric score that is the self-influence;
        methods whose score carries a row-only weight (TRAK's 1 − p_i) override this.
        """
        return self.self_influence(train)

    def relative_norm_floor(self) -> float | None:
        """ε below which `relative_norm_squared` values are treated as rounding noise and
        clamped; None: the pipeline's default, max(1e-12, 1e-6·median). Methods whose norms
        are exact (not differences of rounded losses) give a precision-limit floor."""
        return None

    # helpers
    def _generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.params.seed)
