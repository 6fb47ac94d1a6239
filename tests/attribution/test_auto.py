"""`method: "auto"`: the documented rule per (task, purpose, checkpoints), and `attribute(..., "auto")`
running the chosen method and reporting the choice."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.auto import (
    COUNTERFACTUAL_EXACT_DAMPING,
    COUNTERFACTUAL_KRONECKER_DAMPING,
    AutoInputs,
    AutoParams,
    Goal,
    auto_record,
    choose_method,
)
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.registry import UnknownMethodError, method_class, requestable_methods
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from tests.attribution import fixtures

# (task, self_influence, checkpoints, P) → (method, params the rule sets, report cited)
RULES = [
    ("classification", False, 0, "forward_inf", {}, "q3_leakage.md"),
    ("classification", False, 2, "forward_inf", {}, "q3_leakage.md"),
    ("regression", False, 0, "forward_inf", {}, "q3_leakage.md"),
    ("causal_lm", False, 2, "forward_inf", {}, "q8_service.md"),
    ("classification", True, 2, "forward_inf", {"unlearning": "newton"}, "q4_mislabel.md"),
    ("regression", True, 2, "forward_inf", {"unlearning": "newton"}, "q4_mislabel.md"),
    ("causal_lm", True, 2, "tracin", {}, "q8_service.md"),
    ("classification", True, 0, "trak", {"use_margin": False}, "q4_mislabel.md"),
    ("regression", True, 0, "trak", {}, "q4_mislabel.md"),
    ("causal_lm", True, 0, "tracin", {}, "q8_service.md"),
]


@pytest.mark.parametrize(("task", "self_influence", "checkpoints", "method", "set_params", "report"), RULES)
def test_each_rule_picks_the_documented_method(task: str, self_influence: bool, checkpoints: int, method: str,
                                               set_params: dict[str, object], report: str) -> None:
    ids = tuple(f"ckpt{i}" for i in range(checkpoints))
    choice = choose_method(AutoInputs(task, self_influence, checkpoints, 10_000),
                           AutoParams(checkpoint_model_ids=ids, seed=3))
    assert choice.method == method and report in choice.reason
    assert choice.params.items() >= set_params.items() and choice.params["seed"] == 3
    uses_checkpoints = self_influence and checkpoints > 0
    assert choice.params.get("checkpoint_model_ids", []) == (list(ids) if uses_checkpoints else [])
    method_class(choice.method).params_type.parse(choice.params)  # valid params of that method
    if method == "tracin" and task == "causal_lm":
        assert "last_layer" not in choice.params


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_audits_of_models_above_the_exact_inverse_size_run_last_layer_tracin(task: str) -> None:
    ids = ("ckpt0", "ckpt1")
    small = choose_method(AutoInputs(task, True, 2, 20_000), AutoParams(checkpoint_model_ids=ids))
    large = choose_method(AutoInputs(task, True, 2, 20_001), AutoParams(checkpoint_model_ids=ids))
    assert (small.method, large.method) == ("forward_inf", "tracin")
    assert large.params["last_layer"] is True and large.params["checkpoint_model_ids"] == list(ids)
    assert "q4_mislabel.md" in large.reason and "20,000" in large.reason


def test_auto_params_accept_only_what_was_registered() -> None:
    assert AutoParams.parse({"checkpoint_model_ids": ["a"], "checkpoint_lrs": [0.1]}).checkpoint_lrs == (0.1,)
    for raw, field in (({"steps": 1}, "steps"), ({"normalize": "none"}, "normalize"),
                       ({"checkpoint_lrs": [0.1]}, "checkpoint_lrs")):
        with pytest.raises(ParamsError, match=field):
            AutoParams.parse(raw)
    with pytest.raises(UnknownMethodError, match="valid methods: auto, forward_inf"):
        method_class("nope")
    assert requestable_methods()[0] == "auto"


def test_auto_record_ignores_forward_inf_own_auto_report() -> None:
    assert auto_record({"auto": {"optimizer": "sgd", "steps": 1, "lr": 0.1}}) is None
    record = {"method": "tracin", "params": {}, "reason": "r"}
    assert auto_record({"auto": record, "x": 1}) == record and auto_record(None) is None


def test_attribute_auto_runs_the_chosen_method_and_reports_it(wine_mlp: fixtures.Trained) -> None:
    queries = wine_mlp.test_batch([0, 1])
    context = FitContext("wine-auto", store=InMemoryArtifacts())
    scores = attribute(wine_mlp.adapter, "auto", None, wine_mlp.train, context, queries=queries)
    expected = attribute(wine_mlp.adapter, "forward_inf", {}, wine_mlp.train, FitContext("wine-fi"), queries=queries)
    torch.testing.assert_close(scores, expected)
    report = context.extras["auto"]
    assert report["method"] == "forward_inf" and report["params"]["normalize"] == "relative"

    earlier = ModelAdapter(copy.deepcopy(wine_mlp.adapter.module), wine_mlp.adapter.task)
    with torch.no_grad():
        for p in earlier.module.parameters():
            p.mul_(0.5)
    audit = FitContext("wine-auto", store=InMemoryArtifacts(), checkpoints=[earlier, wine_mlp.adapter])
    si = attribute(wine_mlp.adapter, "auto", {"checkpoint_model_ids": ["e", "f"]}, wine_mlp.train, audit,
                   queries=None, self_influence=True)
    newton = attribute(wine_mlp.adapter, "forward_inf", {"unlearning": "newton", "checkpoint_model_ids": ["e", "f"]},
                       wine_mlp.train, FitContext("wine-n", checkpoints=[earlier, wine_mlp.adapter]),
                       queries=None, self_influence=True)
    torch.testing.assert_close(si, newton)
    assert audit.extras["auto"]["method"] == "forward_inf" and audit.extras["auto"]["params"]["unlearning"] == "newton"


@pytest.mark.parametrize(("task", "size", "ihvp_exact"), [("classification", 20_000, True),
                                                          ("regression", 500, True),
                                                          ("classification", 20_001, False),
                                                          ("causal_lm", 500, False)])
def test_counterfactual_goal_picks_raw_influence(task: str, size: int, ihvp_exact: bool) -> None:
    choice = choose_method(AutoInputs(task, False, 0, size), AutoParams(goal=Goal.COUNTERFACTUAL, seed=2))
    assert choice.method == "influence" and choice.params["normalize"] == "none" and choice.params["seed"] == 2
    assert "q6_lds_neural.md" in choice.reason
    assert choice.params["relative_damping"] == (COUNTERFACTUAL_EXACT_DAMPING if ihvp_exact
                                                 else COUNTERFACTUAL_KRONECKER_DAMPING)
    method_class(choice.method).params_type.parse(choice.params)
    retrieve = choose_method(AutoInputs(task, False, 0, size), AutoParams())
    assert retrieve.method == "forward_inf"  # the default question is retrieval


def test_goal_is_for_prediction_queries_only() -> None:
    with pytest.raises(ParamsError, match=r"params\.goal: applies to queries about predictions"):
        choose_method(AutoInputs("classification", True, 0, 100), AutoParams(goal=Goal.COUNTERFACTUAL))
    with pytest.raises(ParamsError, match="goal"):
        AutoParams.parse({"goal": "why"})


def test_counterfactual_goal_scores_equal_raw_influence_at_its_damping(wine_mlp: fixtures.Trained) -> None:
    queries = wine_mlp.test_batch([0, 1])
    context = FitContext("wine-cf", store=InMemoryArtifacts())
    scores = attribute(wine_mlp.adapter, "auto", {"goal": "counterfactual"}, wine_mlp.train, context,
                       queries=queries)
    plain = FitContext("wine-inf")
    expected = attribute(wine_mlp.adapter, "influence",
                         {"normalize": "none", "relative_damping": COUNTERFACTUAL_EXACT_DAMPING},
                         wine_mlp.train, plain, queries=queries)
    torch.testing.assert_close(scores, expected)
    # the damping is relative_damping · tr(G)/P: 100× the 0.01 default's on the same curvature
    default = FitContext("wine-inf-default")
    attribute(wine_mlp.adapter, "influence", {"normalize": "none"}, wine_mlp.train, default, queries=queries)
    assert context.extras["damping"] == pytest.approx(COUNTERFACTUAL_EXACT_DAMPING / 0.01 * default.extras["damping"], rel=1e-6)
    assert context.extras["auto"]["method"] == "influence"
