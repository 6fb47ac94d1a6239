"""`attribute`: validation, normalisation and the cached self-influence."""

from __future__ import annotations

import pytest
import torch

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf import ForwardInf, ForwardInfParams
from attribution.pipeline import attribute, relative_scores
from tests.attribution import fixtures


def test_requires_queries_unless_self_influence(wine_mlp: fixtures.Trained) -> None:
    context = FitContext("wine")
    with pytest.raises(ValueError, match="queries are required"):
        attribute(wine_mlp.adapter, ForwardInf, {}, wine_mlp.train, context, queries=None)
    with pytest.raises(ValueError, match="pass queries=None"):
        attribute(wine_mlp.adapter, ForwardInf, {}, wine_mlp.train, context,
                  queries=wine_mlp.test_batch([0]), self_influence=True)
    with pytest.raises(ParamsError, match=r"params\.lr"):
        attribute(wine_mlp.adapter, ForwardInf, {"lr": -1.0}, wine_mlp.train, context, queries=wine_mlp.test_batch([0]))
    with pytest.raises(ValueError, match="takes ForwardInfParams"):
        attribute(wine_mlp.adapter, ForwardInf, ForwardInfParams.__mro__[1](), wine_mlp.train, context,
                  queries=wine_mlp.test_batch([0]))


def test_shapes_and_self_influence(wine_mlp: fixtures.Trained) -> None:
    n = len(wine_mlp.y_train)
    queries = wine_mlp.test_batch([0, 1, 2])
    context = FitContext("wine")
    assert attribute(wine_mlp.adapter, ForwardInf, None, wine_mlp.train, context, queries=queries).shape == (1, n)
    assert attribute(wine_mlp.adapter, "forward_inf", {}, wine_mlp.train, context, queries=queries,
                     per_sample=True).shape == (3, n)
    si = attribute(wine_mlp.adapter, ForwardInf, {"steps": 2, "lr": 0.1}, wine_mlp.train, context,
                   queries=None, self_influence=True)
    direct = ForwardInf(wine_mlp.adapter, ForwardInfParams(steps=2, lr=0.1), FitContext("wine")).self_influence(wine_mlp.train)
    torch.testing.assert_close(si[0], direct)


def test_relative_normalisation_is_cached(wine_mlp: fixtures.Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = ForwardInf.relative_norm_squared

    def counting(self: ForwardInf, train: object) -> torch.Tensor:
        calls.append(1)
        return original(self, train)  # type: ignore[arg-type]

    monkeypatch.setattr(ForwardInf, "relative_norm_squared", counting)
    store = InMemoryArtifacts()
    params = {"normalize": "relative", "steps": 1, "lr": 0.05, "optimizer": "sgd"}
    first = attribute(wine_mlp.adapter, ForwardInf, params, wine_mlp.train, FitContext("wine", store=store),
                      queries=wine_mlp.test_batch([0]))
    second = attribute(wine_mlp.adapter, ForwardInf, params, wine_mlp.train, FitContext("wine", store=store),
                       queries=wine_mlp.test_batch([1]))
    assert len(calls) == 1
    raw = attribute(wine_mlp.adapter, ForwardInf, {"steps": 1, "lr": 0.05, "normalize": "none"}, wine_mlp.train,
                    FitContext("wine", store=store), queries=wine_mlp.test_batch([1]))
    assert len(calls) == 1  # raw scores need no norms
    method = ForwardInf(wine_mlp.adapter, ForwardInfParams.parse(params), FitContext("x"))
    norms = original(method, wine_mlp.train)
    torch.testing.assert_close(second, raw / norms.clamp(min=method.relative_norm_floor()).sqrt().float())
    assert not torch.allclose(first, second)


def test_relative_scores_floor() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    si = torch.tensor([4.0, 1.0, -1.0, 0.0])
    out = relative_scores(scores, si)
    # median |s| of [4, 1, 1, 0] is 1 (torch's lower median) → ε = 1e-6
    assert out[0, 0] == pytest.approx(0.5)
    assert out[0, 1] == pytest.approx(2.0)
    assert out[0, 2] == pytest.approx(3000.0)
    assert out[0, 3] == pytest.approx(4000.0)
    with pytest.raises(ValueError, match="rows"):
        relative_scores(scores, torch.ones(3))
