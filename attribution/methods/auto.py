"""`method: "auto"`: a concrete method and params per task, purpose and what was registered.

`choose_method(AutoInputs, AutoParams) -> AutoChoice` is a pure function of

- the task (`classification`, `regression`, `causal_lm`; `attribution.tasks.TaskName`),
- the purpose: a query about predictions (`self_influence=False`) or a self-influence audit,
- whether training checkpoints θ_c were given (`checkpoint_model_ids`, resolved into
  `FitContext.checkpoints`), and the model size P (number of parameters),

so the service (at submission, from the registered model) and `attribution.pipeline.attribute`
(from the loaded model and context) resolve a request identically. Every rule picks the
configuration the fair protocol (`benchmarks/fair.py`) chose on *validation* points, and cites
the committed report line it comes from (figures on the evaluated points of that report):

| purpose | task | checkpoints | → | evidence |
|---|---|---|---|---|
| prediction | classification, regression | any | `forward_inf`, defaults | Q3 `q3_leakage.md` "every entry": top-1 1.0000 for every default of ours, Forward-INF's new query 14.7× faster than influence, 23.6× than TracIn ("Time per query") |
| prediction | causal LM | any | `forward_inf`, defaults (causal-LM defaults: 20 normalised ascent steps) | Q8 `q8_service.md`: that setting (the validation-chosen "Forward-INF, tuned" entry) MRR 0.835, the best entry; the former default (stop at forgotten) 0.7636, above every other default (TracIn with 5 checkpoints 0.6770) |
| self-influence | classification, regression | yes | `tracin` `last_layer: true` over the checkpoints | Q4 `q4_mislabel.md` "every entry": tracin tuned (last_layer=True, chosen on validation 0.9896) AUC 0.9760 = captum TracInCP last layer, the best entry |
| self-influence | causal LM | yes | `tracin` over the checkpoints, every layer | Q4: tracin default (all layers) 0.9668 is the best default; Q8 `q8_service.md` TracIn validation: `last_layer` 0.365 vs all layers 0.742 on a GPT-2 — the last layer is not kept for LMs |
| self-influence | classification, regression | no | `trak` `use_margin: false` (final model) | Q4 "every entry": highest validation AUC of the final-model entries (0.9481 vs influence ekfac 0.9465, forward_inf newton 0.9409), evaluated 0.9318 vs forward_inf default 0.9019 |
| self-influence | causal LM | no | `tracin` (final model, every layer: ‖∇L(θ̂, z_i)‖²) | no LM self-influence study; one gradient pass per row, no inverse, and Q8's preference for every layer |

The validation points alone agree (`python -m benchmarks.defaults_validation`, current code):
Q4 `auto` with 5 checkpoints 0.9896, without 0.9481 (forward_inf default 0.9319, Forward-INF
over the checkpoints 0.9790); Q3 `auto` top-1 1.0. For predictions the rule serves retrieval
(Q3: every default of ours ties, Forward-INF is the cheapest per query); it is not the best
for LDS (Q6 validation: `auto` 0.2795, TracIn's last layer 0.3357, influence EK-FAC raw 0.5758 in
q6_lds_neural.md), a question a request cannot state — README "Choosing a method" names the method.

Regression has no study of its own: it follows classification (noted in `reason`). No rule
depends on the size P: every chosen method costs O(N·P) per pass and none inverts a P×P
matrix (the exact/EK-FAC inverses that do are not chosen), so P is reported in `reason` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

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
    size = f"P = {inputs.num_parameters:,} parameters (no rule depends on P)"
    regression = " (regression has no study of its own; it follows classification)" \
        if task is TaskName.REGRESSION else ""
    if not inputs.self_influence:
        # the same words with or without checkpoints: the choice (and the request hash) ignores them
        unused = " Training checkpoints, if given, are not used for queries about predictions."
        if lm:
            why = ("causal LM, query about predictions: forward_inf with its causal-LM defaults (20 normalised ascent "
                   "steps, relative; chosen on Q8's validation facts), benchmarks/results/q8_service.md: that "
                   "setting scored MRR 0.835 on the evaluated facts, above every other entry (TracIn with 5 "
                   "checkpoints: default 0.677, tuned 0.791)")
        else:
            why = (f"{task.value} query about predictions{regression}: forward_inf with its defaults (relative "
                   "scores), benchmarks/results/q3_leakage.md 'every entry': top-1 1.0000 like every other default "
                   "of ours, one new query 14.7x faster than influence and 23.6x than TracIn ('Time per query')")
        return AutoChoice(MethodName.FORWARD_INF, params.passed_on(checkpoints=False), f"{why}; {size}.{unused}")
    if inputs.num_checkpoints:
        raw = params.passed_on(checkpoints=True)
        if lm:
            why = (f"causal LM self-influence with {inputs.num_checkpoints} training checkpoints: tracin over "
                   "them, every layer (benchmarks/results/q4_mislabel.md: tracin default 0.9668, the best default; "
                   "benchmarks/results/q8_service.md TracIn validation: last_layer 0.365 vs every layer 0.742 "
                   "on a GPT-2, so the last layer is not kept for LMs; no LM self-influence study exists)")
            return AutoChoice(MethodName.TRACIN, raw, f"{why}; {size}.")
        why = (f"{task.value} self-influence with {inputs.num_checkpoints} training checkpoints{regression}: "
               "tracin with last_layer over them, benchmarks/results/q4_mislabel.md 'every entry': tracin tuned "
               "(last_layer=True, chosen on validation: 0.9896) AUC 0.9760 = captum TracInCP last layer, the best "
               "entry")
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
           "entries (0.9481; influence ekfac 0.9465, forward_inf newton 0.9409), evaluated 0.9318 vs forward_inf "
           "default 0.9019; with training checkpoints (checkpoint_model_ids) auto picks TracIn, AUC 0.9760")
    if task is TaskName.CLASSIFICATION:
        raw["use_margin"] = False
    return AutoChoice(MethodName.TRAK, raw, f"{why}; {size}.")


__all__ = ["AUTO", "AutoChoice", "AutoInputs", "AutoParams", "auto_record", "choose_method",
           "with_task_defaults"]
