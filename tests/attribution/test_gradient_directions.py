"""Per-sample gradient directions survive memorisation (issue 12, item 5): `g = s·g̃` with
`log s` exact, equal to the plain gradient where it is representable, and the direction of
the float64 gradient where the float32 one underflows; gradient-similarity (cosine) then ranks
a memorised query's planted copy first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attribution.data import Batch, TensorTrainingSet
from attribution.gradient_directions import gradient_directions
from attribution.methods.base import FitContext
from attribution.methods.gradient_features import unit
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from benchmarks.memorised_setup import MemorisedProblem, memorised_tabular


def scaled_classifier(scale: float) -> tuple[nn.Module, Batch]:
    """A 5-7-3 tanh MLP whose last layer is multiplied by `scale` (margins grow with it)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        module[2].weight.mul_(scale)
        module[2].bias.mul_(scale)
    gen = torch.Generator().manual_seed(1)
    return module, Batch(torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen))


@pytest.mark.parametrize("scripted", [False, True])
def test_directions_times_scale_are_the_gradient(scripted: bool) -> None:
    module, batch = scaled_classifier(1.0)
    model = ModelAdapter(torch.jit.script(module) if scripted else module, ClassificationTask())
    directions, log_scale = gradient_directions(model, batch)
    grads = model.per_sample_grads(batch).double()
    torch.testing.assert_close(directions.double() * log_scale.exp()[:, None], grads, rtol=1e-5, atol=1e-7)


def test_directions_survive_where_the_float32_gradient_underflows() -> None:
    module, batch = scaled_classifier(300.0)
    model = ModelAdapter(module, ClassificationTask())
    grads = model.per_sample_grads(batch)
    exact = ModelAdapter(copy.deepcopy(module).double(), ClassificationTask()).per_sample_grads(
        Batch(batch.inputs.double(), batch.targets))
    directions, log_scale = gradient_directions(model, batch)
    lost = grads.abs().amax(1) == 0
    assert bool(lost.any()) and bool((log_scale[lost] < -87).all())  # the fixture really underflows
    cosine = (unit(directions.double()) * unit(exact)).sum(1)
    assert bool((cosine > 1 - 1e-5).all())


@pytest.fixture(scope="module")
def memorised() -> MemorisedProblem:
    return memorised_tabular()


@pytest.mark.slow
def test_gradient_similarity_ranks_memorised_copies_first(memorised: MemorisedProblem) -> None:
    """Before directions, 14 of the 20 planted copies ranked first (the 6 lost ones at margins
    above ~45, where float32 gradient norms underflow); the float64 cosine ranks all 20."""
    assert int((memorised.margins()[memorised.copies] > 87).sum()) >= 2  # some copies' fp32 gradients are 0
    train = TensorTrainingSet(memorised.x_train, memorised.y_train)
    queries = Batch(memorised.x_query, memorised.y_query)
    scores = attribute(ModelAdapter(memorised.module, ClassificationTask()), "gradient_similarity", {}, train,
                       FitContext("memorised"), queries=queries, per_sample=True)
    assert int((scores.argmax(1) == memorised.copies).sum()) == len(memorised.copies)
    deepest = memorised.margins()[memorised.copies].argsort()[-2:]  # the two most memorised queries
    joint = attribute(ModelAdapter(memorised.module, ClassificationTask()), "gradient_similarity", {}, train,
                      FitContext("memorised"), queries=Batch(memorised.x_query[deepest], memorised.y_query[deepest]))
    assert int(joint.argmax()) in memorised.copies[deepest].tolist()


@pytest.mark.slow
def test_relative_forward_inf_ranks_memorised_copies_first(memorised: MemorisedProblem) -> None:
    """Before log-space loss changes, the copies of the two queries at margins 144 and 186 scored 0
    (18/20): their fp32 query gradients and loss changes underflow."""
    train = TensorTrainingSet(memorised.x_train, memorised.y_train)
    queries = Batch(memorised.x_query, memorised.y_query)
    model = ModelAdapter(memorised.module, ClassificationTask())
    scores = attribute(model, "forward_inf", {"normalize": "relative"}, train, FitContext("memorised-fi"),
                       queries=queries, per_sample=True)
    assert int((scores.argmax(1) == memorised.copies).sum()) == len(memorised.copies)
    scripted = ModelAdapter(torch.jit.script(copy.deepcopy(memorised.module)), ClassificationTask())
    deepest = memorised.margins()[memorised.copies].argsort()[-2:]  # the two most memorised queries
    joint = attribute(scripted, "forward_inf", {"normalize": "relative"}, train, FitContext("memorised-fi-ts"),
                      queries=Batch(memorised.x_query[deepest], memorised.y_query[deepest]))
    assert int(joint.argmax()) in memorised.copies[deepest].tolist()
