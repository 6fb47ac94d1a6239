"""`method: "auto"`: a concrete method and params per task, purpose and what was registered.

`choose_method(AutoInputs, AutoParams) -> AutoChoice` is a pure function of

- the task (`classification`, `regression`, `causal_lm`; `attribution.tasks.TaskName`),
- the purpose: a query about predictions (`self_influence=False`) or a self-influence audit,
- whether training checkpoints θ_c were given (`checkpoint_model_ids`, resolved into
  `FitContext.checkpoints`), and the model size P (number of parameters),

so the service (at submission, from the registered model) and `attribution.pipeline.attribute`
(from the loaded model and context) resolve a request identically. Every rule picks the
configuration the fair protocol (`benchmarks/fair.py`) chose on *validation* points, and cites
the committed report entry it comes from (the figures live in the reports, not here, so they
cannot go stale beside them):

| purpose | task | checkpoints | P | → | evidence (report, table "every entry") |
|---|---|---|---|---|---|
| prediction | classification, regression | any | any | `forward_inf`, defaults | Q3 `q3_leakage.md`: every default of ours ranks the copy first alike; Forward-INF's new query is the cheapest ("Time per query") |
| prediction | causal LM | any | any | `forward_inf`, causal-LM defaults (20 normalised ascent steps in the token embeddings) | Q8 `q8_service.md`: the entry "forward_inf" (defaults) against every other default and tuned entry |
| self-influence | classification, regression | yes | ≤ `EXACT_MAX_PARAMS` | `forward_inf` over the checkpoints, `unlearning: "newton"` | Q4 `q4_mislabel.md`: "forward_inf (5 checkpoints)" tuned (unlearning=newton, the highest validation AUC of every configuration of every entry) is the best entry on the evaluated rows |
| self-influence | classification, regression | yes | > `EXACT_MAX_PARAMS` | `tracin` `last_layer: true` over the checkpoints | Q4: `tracin` defaults (the last layer) next best; the Newton step needs the exact P×P curvature inverse per checkpoint |
| self-influence | causal LM | yes | any | `tracin` over the checkpoints, every layer | Q8 `q8_service.md` TracIn validation: the last layer loses on a GPT-2 |
| self-influence | classification, regression | no | any | `trak` `use_margin: false` (final model) | Q4: the highest validation AUC of the final-model entries |
| self-influence | causal LM | no | any | `tracin` (final model, every layer: ‖∇L(θ̂, z_i)‖²) | no LM self-influence study; one gradient pass per row, no inverse |

`python -m benchmarks.defaults_validation` re-measures the validation points alone. For
predictions the rule serves retrieval (Q3: every default of ours ties, Forward-INF is the
cheapest per query); it is not the best for LDS (Q6 `q6_lds_neural.md`: influence EK-FAC with
`normalize: "none"`), a question a request cannot state — README "Choosing a method" names the
method. Regression has no study of its own: it follows classification (noted in `reason`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from attribution.ihvp.exact import DEFAULT_MAX_PARAMS as EXACT_MAX_PARAMS
from attribution.methods.base import MethodName, MethodParams, ParamsError
from attribution.methods.checkpoints import check_checkpoint_params
from attribution.tasks import TaskName

AUTO = "auto"


@dataclass(frozen=True)
class AutoParams(MethodParams):
    """What `auto` accepts: what was registered (the training checkpoints θ_c as
    `checkpoint_model_ids` with optional `checkpoint_lrs` η_c) and the common `batch_size` and
    `seed`, passed on to the chosen method. Method-specific settings (and `normalize`) are
    refused: name a method to set them."""

    checkpoint_model_ids: tuple[str, ...] = ()
    checkpoint_lrs: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, raw: Any) -> Self:
        if raw and "normalize" in raw:
            raise ParamsError("normalize", "method 'auto' chooses the normalisation; name a method to set it")
        return super().from_dict(raw)

    def validate(self) -> None:
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
    """The resolved method, its raw params (validated by the method's `from_dict`) and why."""

    method: MethodName
    params: dict[str, Any]
    reason: str

    def report(self, resolved_params: dict[str, Any]) -> dict[str, Any]:
        """`result.extras["auto"]`: the method, its params with defaults filled in, the reason."""
        return {"method": self.method.value, "params": resolved_params, "reason": self.reason}


def with_task_defaults(params: MethodParams, task: str) -> MethodParams:
    """The chosen params with the task's defaults made explicit (Forward-INF's `for_task`:
    causal-LM unlearning, relative scores), so the reported and stored params are what runs."""
    for_task = getattr(params, "for_task", None)
    resolved = for_task(task) if callable(for_task) else params
    if not isinstance(resolved, MethodParams):
        raise TypeError(f"for_task returned {type(resolved).__name__}")
    return resolved


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


__all__ = ["AUTO", "AutoChoice", "AutoInputs", "AutoParams", "auto_record", "choose_method",
           "with_task_defaults"]
