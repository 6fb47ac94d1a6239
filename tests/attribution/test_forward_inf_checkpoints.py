"""Forward-INF self-influence over training checkpoints: `Σ_c η_c s(θ_c, z_i)`, the checkpoints
from the context (named by `params.checkpoint_model_ids`), query scores untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf_params import ForwardInfParams
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from tests.attribution import fixtures


def _earlier(trained: fixtures.Trained, scale: float) -> ModelAdapter:
    """A different point of the same architecture (a stand-in for an earlier checkpoint)."""
    module = copy.deepcopy(trained.adapter.module)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return ModelAdapter(module, trained.adapter.task)


@pytest.mark.parametrize("params", [{}, {"self_influence_mode": "gradient_norm"}, {"steps": 2, "lr": 0.05}])
def test_self_influence_is_the_lr_weighted_sum_over_checkpoints(wine_mlp: fixtures.Trained,
                                                                params: dict[str, object]) -> None:
    checkpoints, lrs = [_earlier(wine_mlp, 0.5), wine_mlp.adapter], [0.5, 2.0]
    context = FitContext("wine-ckpt", store=InMemoryArtifacts(), checkpoints=checkpoints, checkpoint_lrs=lrs)
    named = {**params, "checkpoint_model_ids": ["early", "final"], "checkpoint_lrs": lrs}
    summed = attribute(wine_mlp.adapter, "forward_inf", named, wine_mlp.train, context, queries=None,
                       self_influence=True)[0]
    each = [attribute(c, "forward_inf", params, wine_mlp.train, FitContext(f"wine-c{i}"), queries=None,
                      self_influence=True)[0] for i, c in enumerate(checkpoints)]
    torch.testing.assert_close(summed, lrs[0] * each[0] + lrs[1] * each[1], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(summed, each[1], rtol=1e-2)  # not the final model alone


def test_checkpoints_leave_query_scores_alone_and_must_match_the_params(wine_mlp: fixtures.Trained) -> None:
    queries = wine_mlp.test_batch([0, 1])
    with_checkpoints = FitContext("wine-q", checkpoints=[_earlier(wine_mlp, 0.5)])
    scores = attribute(wine_mlp.adapter, "forward_inf", {"checkpoint_model_ids": ["early"]}, wine_mlp.train,
                       with_checkpoints, queries=queries)
    plain = attribute(wine_mlp.adapter, "forward_inf", {}, wine_mlp.train, FitContext("wine-p"), queries=queries)
    torch.testing.assert_close(scores, plain)
    with pytest.raises(ValueError, match="name 2 checkpoints but the context holds 1"):
        attribute(wine_mlp.adapter, "forward_inf", {"checkpoint_model_ids": ["a", "b"]}, wine_mlp.train,
                  FitContext("wine-x", checkpoints=[_earlier(wine_mlp, 0.5)]), queries=None, self_influence=True)
    with pytest.raises(ParamsError, match="checkpoint_lrs"):
        ForwardInfParams.parse({"checkpoint_model_ids": ["a"], "checkpoint_lrs": [0.1, 0.2]})
    with pytest.raises(ParamsError, match=r"checkpoint_lrs\[0\]"):
        ForwardInfParams.parse({"checkpoint_model_ids": ["a"], "checkpoint_lrs": [-1.0]})
