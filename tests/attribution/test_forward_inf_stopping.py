"""Forward-INF's label-free stopping rule (`stop="forgotten"`) and the causal-LM defaults."""

from __future__ import annotations

import pytest
import torch

from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext, Normalize, ParamsError
from attribution.methods.forward_inf import ForwardInf
from attribution.methods.forward_inf_params import (
    CAUSAL_LM_DEFAULTS,
    ForwardInfParams,
    Optimizer,
    StopRule,
)
from attribution.methods.forward_inf_stopping import forgotten_level, shuffled_context
from attribution.methods.forward_inf_unlearning import StackedModel, Unlearning, unlearn_copy
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import CausalLMTask

VOCAB, LENGTH = 12, 7


@pytest.fixture(scope="module")
def lm() -> tuple[ModelAdapter, TensorTrainingSet, Batch]:
    """A 1-layer, 8-wide GPT-2 fitted for a moment on 16 random rows; 3 queries counting their last 2 tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    module = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(1, VOCAB, (16, LENGTH))
    model = ModelAdapter(module, CausalLMTask())
    train = TensorTrainingSet({"input_ids": ids}, ids.clone())
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(train.all).mean().backward()
        optimizer.step()
    module.eval()
    query_ids = ids[:3].clone()
    targets = torch.full_like(query_ids, -100)
    targets[:, -2:] = query_ids[:, -2:]
    return model, train, Batch({"input_ids": query_ids}, targets)


def test_shuffled_context_permutes_only_the_context_tokens(lm) -> None:
    _, _, queries = lm
    shuffled = shuffled_context(queries, torch.Generator().manual_seed(0))
    before, after = queries.inputs["input_ids"], shuffled.inputs["input_ids"]
    assert torch.equal(shuffled.targets, queries.targets)
    assert torch.equal(after[:, -2:], before[:, -2:])  # counted tokens stay in place
    for row in range(len(before)):
        assert sorted(after[row, :-2].tolist()) == sorted(before[row, :-2].tolist())
    assert not torch.equal(after, before)


def test_every_token_counted_shuffles_the_whole_row(lm) -> None:
    _, train, _ = lm
    rows = train.all.slice(0, 4)
    shuffled = shuffled_context(rows, torch.Generator().manual_seed(1))
    for row in range(4):
        assert sorted(shuffled.inputs["input_ids"][row].tolist()) == sorted(rows.inputs["input_ids"][row].tolist())


@pytest.mark.parametrize("optimizer", ["normalized_sgd", "sgd", "adam"])
def test_each_query_stops_once_forgotten_as_if_run_alone(lm, optimizer: str) -> None:
    model, _, queries = lm
    level = forgotten_level(model.loss, queries)
    lr = 5.0 if optimizer == "sgd" else 0.05
    how = Unlearning(optimizer, 40, lr, until_forgotten=True)
    stacked_model = StackedModel(model)
    stacked = stacked_model.unlearn(queries, how)
    taken = how.log.steps_taken
    with torch.no_grad():
        final = stacked_model.own_losses(stacked, queries)
    assert len(taken) == 3 and all(0 < k < 40 for k in taken)
    assert bool((final.double() >= level).all())
    if optimizer == "adam":  # its sign-like steps amplify vmap's rounding where |g| ~ ε: not comparable elementwise
        return
    for q in range(3):  # the same query alone, K = its own step count, no stopping rule: the same parameters
        alone = unlearn_copy(model, queries.slice(q, q + 1), Unlearning(optimizer, taken[q], lr))
        for name, value in alone.params().items():
            torch.testing.assert_close(stacked[name][q], value, rtol=1e-4, atol=1e-6)


def test_forgotten_scores_report_the_steps_taken(lm) -> None:
    model, train, queries = lm
    context = FitContext("stop-test")
    params = {"stop": "forgotten", "optimizer": "normalized_sgd", "steps": 40, "lr": 0.05}
    scores = attribute(model, "forward_inf", params, train, context, queries=queries, per_sample=True)
    steps = context.extras["unlearning_steps"]
    fixed = attribute(model, "forward_inf", {**params, "stop": "fixed", "steps": steps[0]}, train,
                      FitContext("stop-test-fixed"), queries=queries.slice(0, 1), per_sample=True)
    torch.testing.assert_close(scores[:1], fixed, rtol=1e-4, atol=1e-6)
    joint = FitContext("stop-test-joint")
    attribute(model, "forward_inf", params, train, joint, queries=queries)
    assert len(joint.extras["unlearning_steps"]) == 1


def test_causal_lm_defaults_fill_only_unset_fields() -> None:
    lm = ForwardInfParams().for_task("causal_lm")
    assert {k: getattr(lm, k) for k in CAUSAL_LM_DEFAULTS} == CAUSAL_LM_DEFAULTS
    classifier = ForwardInfParams().for_task("classification").resolved()
    # classifiers: fixed K, relative scores (the fair protocol's leakage validation) and so normalized SGD
    assert classifier.stop is StopRule.FIXED and classifier.optimizer is Optimizer.NORMALIZED_SGD
    assert classifier.normalize is Normalize.RELATIVE
    explicit = ForwardInfParams.parse({"steps": 3, "normalize": "none"}).for_task("causal_lm")
    assert explicit.stop is StopRule.FIXED and explicit.steps == 3 and explicit.normalize is Normalize.NONE
    newton = ForwardInfParams.parse({"unlearning": "newton"}).for_task("causal_lm")
    assert newton.stop is StopRule.FIXED and newton.optimizer is None and newton.normalize is Normalize.RELATIVE


def test_the_method_resolves_its_task_defaults(lm) -> None:
    model, _, _ = lm
    method = ForwardInf(model, ForwardInfParams(), FitContext("defaults"))
    assert method.params.stop is StopRule.FIXED and method.params.normalize is Normalize.RELATIVE
    assert (method.params.steps, method.params.lr) == (20, 0.05)


def test_stop_is_validated() -> None:
    with pytest.raises(ParamsError, match=r"params\.stop"):
        ForwardInfParams.parse({"stop": "never"})
    with pytest.raises(ParamsError, match=r"params\.stop"):
        ForwardInfParams.parse({"unlearning": "newton", "stop": "forgotten"})
