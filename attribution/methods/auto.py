"""`method: "auto"`: a concrete method and params per task, purpose and what was registered.

`choose_method(AutoInputs, AutoParams) -> AutoChoice` is a pure function of

- the task (`classification`, `regression`, `causal_lm`; `attribution.tasks.TaskName`),
- the purpose: a query about predictions (`self_influence=False`) or a self-influence audit,
- for predictions, the question (`params.goal`): `"retrieve"` (default; which training rows
  taught this prediction — leaked copies, facts, debugging) or `"counterfactual"` (how the
  query's loss would change if rows were removed — what the linear datamodeling score, LDS,
  measures),
- whether training checkpoints θ_c were given (`checkpoint_model_ids`, resolved into
  `FitContext.checkpoints`), and the model size P (number of parameters),

so the service (at submission, from the registered model) and `attribution.pipeline.attribute`
(from the loaded model and context) resolve a request identically. Every rule picks the
configuration the fair protocol (`benchmarks/fair.py`) chose on *validation* points, and cites
the committed report entry it comes from (the figures live in the reports, not here, so they
cannot go stale beside them):

| purpose | task | checkpoints | P | → | evidence (report, table "every entry") |
|---|---|---|---|---|---|
| prediction, retrieve | classification, regression | any | any | `forward_inf`, defaults | Q3 `q3_leakage.md`: every default of ours ranks the copy first alike; Forward-INF's new query is the cheapest ("Time per query") |
| prediction, retrieve | causal LM | any | any | `forward_inf`, causal-LM defaults (20 normalised ascent steps in the token embeddings) | Q8 `q8_service.md`: the entry "forward_inf" (defaults) against every other default and tuned entry |
| prediction, counterfactual | classification, regression | any | ≤ `EXACT_MAX_PARAMS` | `influence`, raw (`normalize: "none"`), exact inverse, `relative_damping: COUNTERFACTUAL_EXACT_DAMPING` | Q6 `q6_lds_neural.md`: the entry "auto, goal=counterfactual" against every entry; the damping from `benchmarks/defaults_validation.py q6` (validation queries only) |
| prediction, counterfactual | any | any | > `EXACT_MAX_PARAMS`, or causal LM | `influence`, raw, `ihvp` auto (EK-FAC; an LM's block linears), `relative_damping: COUNTERFACTUAL_KRONECKER_DAMPING` | Q6 `q6_lds_neural.md`: influence `ihvp=ekfac, normalize=none`, the best of our EK-FAC entries; the damping from `defaults_validation.py q6` |
| self-influence | classification, regression | yes | ≤ `EXACT_MAX_PARAMS` | `forward_inf` over the checkpoints, `unlearning: "newton"` | Q4 `q4_mislabel.md`: "forward_inf (5 checkpoints)" tuned (unlearning=newton, the highest validation AUC of every configuration of every entry) is the best entry on the evaluated rows |
| self-influence | classification, regression | yes | > `EXACT_MAX_PARAMS` | `tracin` `last_layer: true` over the checkpoints | Q4: `tracin` defaults (the last layer) next best; the Newton step needs the exact P×P curvature inverse per checkpoint |
| self-influence | causal LM | yes | any | `tracin` over the checkpoints, every layer | Q8 `q8_service.md` TracIn validation: the last layer loses on a GPT-2 |
| self-influence | classification, regression | no | any | `trak` `use_margin: false` (final model) | Q4: the highest validation AUC of the final-model entries |
| self-influence | causal LM | no | any | `tracin` (final model, every layer: ‖∇L(θ̂, z_i)‖²) | no LM self-influence study; one gradient pass per row, no inverse |

`python -m benchmarks.defaults_validation` re-measures the validation points alone. The two
questions about a prediction want opposite scores: retrieval wants each row's score relative
to its own norm (an exact copy first, Cauchy–Schwarz; raw scores fail Q3), while the LDS wants
raw magnitudes (relative scores fail Q6). No one default serves both, so the request states
its question with `goal`; retrieval is the default. Regression has no study of its own: it
follows classification (noted in `reason`). `goal` applies to queries about predictions only
(a self-influence audit asks neither question): `ParamsError` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

from pydantic import StrictFloat, StrictStr
from pydantic.dataclasses import dataclass as pydantic_dataclass

from attribution.ihvp.exact import DEFAULT_MAX_PARAMS as EXACT_MAX_PARAMS
from attribution.methods.base import PARAMS_CONFIG, MethodName, MethodParams, ParamsError
from attribution.methods.checkpoints import check_checkpoint_params
from attribution.tasks import TaskName

AUTO = "auto"
# `relative_damping` for counterfactual questions (λ = r · tr(G)/P): the best validation LDS of
# `benchmarks.defaults_validation.COUNTERFACTUAL_DAMPINGS` (0.01 … 3) on Q6, per estimator. The
# 0.01 default under-damps raw scores (noise of the smallest eigen-directions; relative scores
# divide it out); EK-FAC's own eigenvalues want less.
COUNTERFACTUAL_EXACT_DAMPING = 1.0
COUNTERFACTUAL_KRONECKER_DAMPING = 0.1


class Goal(StrEnum):
    """The question a query about predictions asks (module docstring)."""

    RETRIEVE = "retrieve"
    COUNTERFACTUAL = "counterfactual"


@pydantic_dataclass(frozen=True, config=PARAMS_CONFIG)
class AutoParams(MethodParams):
    """What `auto` accepts: the question (`goal`, for queries about predictions), what was
    registered (the training checkpoints θ_c as `checkpoint_model_ids` with optional
    `checkpoint_lrs` η_c) and the common `batch_size` and `seed`, passed on to the chosen
    method. Method-specific settings (and `normalize`) are refused: name a method to set them."""

    goal: Goal = Goal.RETRIEVE
    checkpoint_model_ids: tuple[StrictStr, ...] = ()
    checkpoint_lrs: tuple[StrictFloat, ...] = ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Self:
        if raw and "normalize" in raw:
            raise ParamsError("normalize", "method 'auto' chooses the normalisation; name a method to set it")
        return super().parse(raw)

    def check(self) -> None:
        check_checkpoint_params(self.checkpoint_model_ids, self.checkpoint_lrs)

    def passed_on(self, *, checkpoints: bool) -> dict[str, Any]:
        """The raw params every chosen method gets: `batch_size`, `seed`, and the checkpoints
        when the chosen method uses them."""
        raw: dict[str, Any] = {"batch_size": self.batch_size, "seed": self.seed}
        if checkpoints and self.checkpoint_model_ids:
            raw["checkpoint_model_ids"] = list(self.checkpoint_model_ids)
            if self.checkpoint_lrs:
                raw["checkpoint_lrs"] = list(self.checkpoint_lrs)
        return raw


@dataclass(frozen=True)
class AutoInputs:
    """What the choice depends on: `task` name, `self_influence` (the purpose), the number of
    training checkpoints given, the number of model parameters P."""

    task: str
    self_influence: bool
    num_checkpoints: int
    num_parameters: int


@dataclass(frozen=True)
class AutoChoice:
    """The resolved method, its raw params (validated by the method's `parse`) and why."""

    method: MethodName
    params: dict[str, Any]
    reason: str

    def report(self, resolved_params: dict[str, Any]) -> dict[str, Any]:
        """`result.extras["auto"]`: the method, its params with defaults filled in, the reason."""
        return {"method": self.method.value, "params": resolved_params, "reason": self.reason}


def auto_record(extras: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The `method: "auto"` record (`AutoChoice.report`) in a query's extras, else None.
    (Forward-INF's own `params.auto` reports its optimizer/K/α under the same key, never with
    a `method` and a `reason`.)"""
    record = (extras or {}).get("auto")
    if isinstance(record, dict) and {"method", "params", "reason"} <= record.keys():
        return record
    return None


def choose_method(inputs: AutoInputs, params: AutoParams) -> AutoChoice:
    """The concrete method for `method: "auto"` (module docstring: one rule per table line)."""
    task = TaskName(inputs.task)
    lm = task is TaskName.CAUSAL_LM
    size = f"P = {inputs.num_parameters:,} parameters"
    regression = " (regression has no study of its own; it follows classification)" \
        if task is TaskName.REGRESSION else ""
    if inputs.self_influence and params.goal is not Goal.RETRIEVE:
        raise ParamsError("goal", "applies to queries about predictions; a self_influence audit takes no goal")
    if not inputs.self_influence and params.goal is Goal.COUNTERFACTUAL:
        return _counterfactual(task, inputs, params, size)
    if not inputs.self_influence:
        # the same words with or without checkpoints: the choice (and the request hash) ignores them
        unused = " Training checkpoints, if given, are not used for queries about predictions."
        if lm:
            why = ("causal LM, query about predictions: forward_inf with its causal-LM defaults (20 normalised ascent "
                   "steps in the token embeddings, relative; chosen on Q8's validation facts), benchmarks/results/q8_service.md 'every "
                   "entry': forward_inf defaults against every other default and tuned entry")
        else:
            why = (f"{task.value} query about predictions{regression}: forward_inf with its defaults (relative "
                   "scores), benchmarks/results/q3_leakage.md 'every entry': every default of ours ranks the copy "
                   "first alike, and Forward-INF's new query is the cheapest ('Time per query')")
        return AutoChoice(MethodName.FORWARD_INF, params.passed_on(checkpoints=False), f"{why}; {size}.{unused}")
    if inputs.num_checkpoints:
        raw = params.passed_on(checkpoints=True)
        if lm:
            why = (f"causal LM self-influence with {inputs.num_checkpoints} training checkpoints: tracin over "
                   "them, every layer (benchmarks/results/q8_service.md, TracIn validation: the last layer loses "
                   "on a GPT-2; no LM self-influence study exists)")
            return AutoChoice(MethodName.TRACIN, raw, f"{why}; {size}.")
        if inputs.num_parameters <= EXACT_MAX_PARAMS:
            why = (f"{task.value} self-influence with {inputs.num_checkpoints} training checkpoints{regression}: "
                   "forward_inf over them with unlearning=newton (exact curvature inverse at this size), "
                   "benchmarks/results/q4_mislabel.md 'every entry': 'forward_inf (5 checkpoints)' tuned on "
                   "validation, the best entry")
            return AutoChoice(MethodName.FORWARD_INF, {**raw, "unlearning": "newton"}, f"{why}; {size}.")
        why = (f"{task.value} self-influence with {inputs.num_checkpoints} training checkpoints{regression}: "
               f"tracin with last_layer over them (above {EXACT_MAX_PARAMS:,} parameters the Newton step of "
               "forward_inf needs an approximate inverse per checkpoint), benchmarks/results/q4_mislabel.md "
               "'every entry': tracin defaults (last layer) next to the best entry")
        return AutoChoice(MethodName.TRACIN, {**raw, "last_layer": True}, f"{why}; {size}.")
    raw = params.passed_on(checkpoints=False)
    if lm:
        why = ("causal LM self-influence without checkpoints: tracin on the final model, every layer "
               "(the squared loss-gradient norm: one gradient pass per row, no inverse; no LM self-influence "
               "study exists, and benchmarks/results/q8_service.md's TracIn validation prefers every layer); "
               "register training checkpoints and pass checkpoint_model_ids for TracIn over them")
        return AutoChoice(MethodName.TRACIN, raw, f"{why}; {size}.")
    why = (f"{task.value} self-influence without checkpoints{regression}: trak with use_margin=false on the final "
           "model, benchmarks/results/q4_mislabel.md 'every entry': the best validation AUC of the final-model "
           "entries; registering training checkpoints (checkpoint_model_ids) does better there")
    if task is TaskName.CLASSIFICATION:
        raw["use_margin"] = False
    return AutoChoice(MethodName.TRAK, raw, f"{why}; {size}.")


def _counterfactual(task: TaskName, inputs: AutoInputs, params: AutoParams, size: str) -> AutoChoice:
    """`goal: "counterfactual"`: raw influence with the damping chosen on Q6's validation
    queries — the exact inverse up to `EXACT_MAX_PARAMS`, else the estimator `ihvp: auto`
    picks (EK-FAC; an LM's block linears)."""
    raw = {**params.passed_on(checkpoints=False), "normalize": "none"}
    unused = " Training checkpoints, if given, are not used for queries about predictions."
    chosen = "chosen on Q6's validation queries, benchmarks/defaults_validation.py q6"
    if task is not TaskName.CAUSAL_LM and inputs.num_parameters <= EXACT_MAX_PARAMS:
        why = (f"{task.value} counterfactual query: influence, raw, the exact curvature inverse with relative_damping "
               f"{COUNTERFACTUAL_EXACT_DAMPING:g} ({chosen}), benchmarks/results/q6_lds_neural.md 'every entry': "
               "'auto, goal=counterfactual' against every entry (raw scores: the LDS compares score magnitudes, "
               "which relative scores divide out)")
        return AutoChoice(MethodName.INFLUENCE, {**raw, "relative_damping": COUNTERFACTUAL_EXACT_DAMPING},
                          f"{why}; {size}.{unused}")
    what = "causal LM" if task is TaskName.CAUSAL_LM else f"{task.value} above {EXACT_MAX_PARAMS:,} parameters"
    why = (f"{what}, counterfactual query: influence, raw, ihvp auto (EK-FAC) with relative_damping "
           f"{COUNTERFACTUAL_KRONECKER_DAMPING:g} ({chosen}); benchmarks/results/q6_lds_neural.md 'every entry': "
           "influence ihvp=ekfac, normalize=none, our best EK-FAC entry (no LM LDS study exists)")
    return AutoChoice(MethodName.INFLUENCE, {**raw, "relative_damping": COUNTERFACTUAL_KRONECKER_DAMPING},
                      f"{why}; {size}.{unused}")


__all__ = [
    "AUTO",
    "COUNTERFACTUAL_EXACT_DAMPING",
    "COUNTERFACTUAL_KRONECKER_DAMPING",
    "AutoChoice",
    "AutoInputs",
    "AutoParams",
    "Goal",
    "auto_record",
    "choose_method",
]
