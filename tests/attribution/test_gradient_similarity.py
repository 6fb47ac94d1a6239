"""Gradient dot/cosine similarity: exact values, leakage retrieval, self-influence rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution.artifacts import InMemoryArtifacts
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.gradient_similarity import (
    GradientSimilarity,
    GradientSimilarityParams,
    Similarity,
)
from attribution.model import ModelAdapter
from tests.attribution.fixtures import Leakage, Trained


def exact_loss_grads(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """`[N, P]` cross-entropy gradients, one backward per row, in float64.

    float64 because fp32 `F.cross_entropy` rounds the gradient of confidently fitted rows
    (`p_y → 1`) to noise, whose cosine is then meaningless; the product's loss is exact there.
    """
    module = copy.deepcopy(module).double()
    params = list(module.parameters())
    x = x.double()
    return torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(module(x[i: i + 1]), y[i: i + 1]), params)])
        for i in range(len(y))
    ]).float()


def similarity(model: ModelAdapter, **params: object) -> GradientSimilarity:
    return GradientSimilarity(model, GradientSimilarityParams.parse(params), FitContext("test", InMemoryArtifacts()))


def test_cosine_is_the_default() -> None:
    assert GradientSimilarityParams().similarity is Similarity.COSINE


def test_dot_and_cosine_equal_exact_values(wine_mlp: Trained) -> None:
    queries = wine_mlp.test_batch([0, 3, 6, 9])
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)
    g_query = exact_loss_grads(wine_mlp.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    dot = similarity(wine_mlp.adapter, similarity="dot").score(queries, wine_mlp.train, per_sample=True)
    torch.testing.assert_close(dot, g_query @ g_train.T, rtol=1e-4, atol=1e-6)
    method = similarity(wine_mlp.adapter)
    cosine = method.score(queries, wine_mlp.train, per_sample=True)
    assert cosine.shape == (4, len(wine_mlp.y_train))
    torch.testing.assert_close(cosine, F.normalize(g_query, dim=1) @ F.normalize(g_train, dim=1).T, rtol=1e-4, atol=1e-5)
    joint = method.score(queries, wine_mlp.train)
    assert joint.shape == (1, len(wine_mlp.y_train))
    mean_query = F.normalize(g_query.mean(0, keepdim=True), dim=1)
    torch.testing.assert_close(joint, mean_query @ F.normalize(g_train, dim=1).T, rtol=1e-4, atol=1e-5)


def test_cosine_ranks_the_planted_copy_first(digits_leakage: Leakage) -> None:
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    found = {}
    for kind in Similarity:
        scores = similarity(trained.adapter, similarity=kind.value).score(queries, trained.train, per_sample=True)
        copies = scores[torch.arange(len(queries)), digits_leakage.copy_index]
        assert (copies > 0).all()
        found[kind] = int((scores.argmax(dim=1) == digits_leakage.copy_index).sum())
    print(f"\ngradient similarity top-1 on digits leakage: cosine {found[Similarity.COSINE]}/20, "
          f"dot {found[Similarity.DOT]}/20")
    assert found[Similarity.COSINE] >= 19


def test_projected_cosine_still_finds_copies_and_is_deterministic(digits_leakage: Leakage) -> None:
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    scores = similarity(trained.adapter, projection_dim=128, seed=1).score(queries, trained.train, per_sample=True)
    assert torch.equal(scores, similarity(trained.adapter, projection_dim=128, seed=1)
                       .score(queries, trained.train, per_sample=True))
    assert int((scores.argmax(dim=1) == digits_leakage.copy_index).sum()) >= 19
    assert scores.max() <= 1 + 1e-5


def test_self_influence_dot_is_squared_norm_and_cosine_refuses(wine_mlp: Trained) -> None:
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)
    self_dot = similarity(wine_mlp.adapter, similarity="dot").self_influence(wine_mlp.train)
    torch.testing.assert_close(self_dot, g_train.square().sum(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="constant"):
        similarity(wine_mlp.adapter).self_influence(wine_mlp.train)


def test_last_layer_cosine_uses_that_layer_only(wine_mlp: Trained) -> None:
    queries = wine_mlp.test_batch([2])
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)[:, -51:]
    g_query = exact_loss_grads(wine_mlp.module, queries.inputs, queries.targets)[:, -51:]  # type: ignore[arg-type]
    scores = similarity(wine_mlp.adapter, last_layer=True).score(queries, wine_mlp.train)
    torch.testing.assert_close(scores, F.normalize(g_query, dim=1) @ F.normalize(g_train, dim=1).T, rtol=1e-4, atol=1e-5)


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ParamsError, match="similarity"):
        GradientSimilarityParams.parse({"similarity": "euclidean"})
    with pytest.raises(ParamsError, match="normalize"):
        GradientSimilarityParams.parse({"normalize": "relative"})
    assert GradientSimilarityParams.parse({"normalize": "relative", "similarity": "dot"}).similarity is Similarity.DOT
    with pytest.raises(ParamsError, match="projection_dim"):
        GradientSimilarityParams.parse({"projection_dim": -3})
