"""Integrated Influence: Lemma 2.5 (K = 1 + prediction baseline = influence functions), the
closed form on linear regression, per-query unlearning, baselines, validation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.influence import IHVPChoice, InfluenceFunction, InfluenceParams
from attribution.methods.integrated_influence import (
    IntegratedInfluence,
    IntegratedInfluenceParams,
    unlearn,
)
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from attribution.tasks import RegressionTask
from tests.attribution.fixtures import Trained


def _iif(model: ModelAdapter, store: InMemoryArtifacts | None = None, **params: object) -> IntegratedInfluence:
    return IntegratedInfluence(model, IntegratedInfluenceParams(**params), FitContext("m", store))  # type: ignore[arg-type]


def _regression() -> tuple[ModelAdapter, TensorTrainingSet, Batch]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=gen)
    y = (x @ torch.randn(5, 2, generator=gen)).tanh() + 0.1 * torch.randn(120, 2, generator=gen)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(module.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        ((module(x) - y) ** 2).sum(1).mean().backward()
        opt.step()
    return ModelAdapter(module.eval(), RegressionTask()), TensorTrainingSet(x[:100], y[:100]), Batch(x[100:], y[100:])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _least_squares() -> tuple[ModelAdapter, Batch, Batch]:
    """float64 `nn.Linear(4, 1)` holding the closed-form OLS fit (with bias) of 60 noisy rows;
    the 60 training rows and 3 query rows as batches."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(63, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(63, 1, generator=gen,
                                                                                        dtype=torch.float64)
    design = torch.cat([x[:60], torch.ones(60, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y[:60]).solution
    module = nn.Linear(4, 1).double()
    with torch.no_grad():
        module.weight.copy_(solution[:-1].T)
        module.bias.copy_(solution[-1])
    return ModelAdapter(module.eval(), RegressionTask()), Batch(x[:60], y[:60]), Batch(x[60:], y[60:])


def _design(batch: Batch) -> torch.Tensor:
    """`[B, D+1]` inputs with the bias column."""
    assert isinstance(batch.inputs, torch.Tensor)
    return torch.cat([batch.inputs, torch.ones(len(batch), 1, dtype=batch.inputs.dtype)], dim=1)


def _closed_form_iif(train: Batch, query: Batch, theta_hat: torch.Tensor, *, steps: int,
                     unlearn_steps: int, unlearn_lr: float, reg: float, damping: float) -> torch.Tensor:
    """`[N]` Integrated Influence of one query on OLS, from the algebra alone (module docstring):
    full-batch unlearning `θ ← θ − α(−∇L_q + reg ∇R)`, `G = (2/N) X̃ᵀX̃`, and the K-step sum
    `(1/K) Σ_k 2 r_q(θ_k) x̃_qᵀ (G + λI)⁻¹ x̃_i · 2 (x̃_iᵀθ_u − y_i)`, `θ_k = θ_u + (k/K)(θ̂ − θ_u)`."""
    x, y = _design(train), train.targets[:, 0]  # [N, D+1], [N]
    xq, yq = _design(query)[0], float(query.targets[0, 0])
    n = len(y)
    theta = theta_hat.clone()
    for _ in range(unlearn_steps):
        ascent = 2 * xq * (xq @ theta - yq)
        descent = (2 / n) * x.T @ (x @ theta - y)
        theta = theta - unlearn_lr * (-ascent + reg * descent)
    theta_u = theta
    inverse = torch.linalg.inv((2 / n) * x.T @ x + damping * torch.eye(x.shape[1], dtype=torch.float64))
    deltas = 2 * (x @ theta_u - y)  # [N]: d_i = 2 (y'_i − y_i)
    out = torch.zeros(n, dtype=torch.float64)
    for k in range(1, steps + 1):
        theta_k = theta_u + (k / steps) * (theta_hat - theta_u)
        query_grad = 2 * xq * (xq @ theta_k - yq)
        out += (query_grad @ inverse @ x.T) * deltas / steps
    return out


@pytest.mark.parametrize("per_sample", [True, False])
def test_one_step_with_prediction_baseline_is_the_influence_function(wine_mlp: Trained, per_sample: bool) -> None:
    """Lemma 2.5: J_iᵀ(p_i − e_{y_i}) = ∇ℓ_i, so the K = 1 path term is the IF score. A float64
    copy of the model keeps round-off of the two gradient routes far below the tolerance."""
    store = InMemoryArtifacts()
    model = ModelAdapter(copy.deepcopy(wine_mlp.module).double(), wine_mlp.adapter.task)
    train = TensorTrainingSet(wine_mlp.x_train.double(), wine_mlp.y_train)
    queries = Batch(wine_mlp.x_test[:3].double(), wine_mlp.y_test[:3])
    influence = InfluenceFunction(model, InfluenceParams(ihvp=IHVPChoice.EXACT, damping=0.01),
                                  FitContext("m", store)).score(queries, train, per_sample=per_sample)
    iif = _iif(model, store, ihvp="exact", damping=0.01, steps=1, baseline="prediction")
    integrated = iif.score(queries, train, per_sample=per_sample)
    assert iif.context.extras["ihvp_fit_cached"] is True  # the IF fit is reused at θ̂
    assert _relative(integrated, influence) <= 1e-5


def test_lemma_holds_for_regression_too() -> None:
    model, train, queries = _regression()
    influence = InfluenceFunction(model, InfluenceParams(ihvp=IHVPChoice.EXACT, damping=0.01),
                                  FitContext("r")).score(queries, train, per_sample=True)
    integrated = _iif(model, ihvp="exact", damping=0.01, steps=1, baseline="prediction").score(
        queries, train, per_sample=True)
    assert _relative(integrated, influence) <= 1e-5


def test_unlearned_baseline_matches_the_closed_form_on_linear_regression() -> None:
    """Squared error on a linear model: constant curvature, exact path, affine query gradient,
    so every quantity has a closed form. Three queries scored per_sample, each unlearned alone."""
    model, rows, queries = _least_squares()
    kwargs: dict[str, Any] = dict(steps=4, unlearn_steps=3, unlearn_lr=0.02, reg=1.0, damping=0.05)
    scores = _iif(model, ihvp="exact", **kwargs).score(queries, TensorTrainingSet(rows.inputs, rows.targets),
                                                       per_sample=True)
    theta_hat = model.flat_params().double()  # [weight..., bias], the design's column order
    for q in range(len(queries)):
        expected = _closed_form_iif(rows, queries.slice(q, q + 1), theta_hat, **kwargs)
        assert _relative(scores[q].double(), expected) <= 1e-5


def test_on_linear_regression_iif_is_rescaled_influence_plus_the_unlearning_offsets() -> None:
    """`d_i ∝ x̃_iᵀθ_u − y_i = e_i + x̃_iᵀ(θ_u − θ̂)`: keeping only the residual `e_i` of each row's
    delta leaves the influence-function score times `r_q(θ_t̄) / r_q(θ̂)` (one factor per query)."""
    model, rows, queries = _least_squares()
    train, query = TensorTrainingSet(rows.inputs, rows.targets), queries.slice(0, 1)
    kwargs: dict[str, Any] = dict(steps=2, unlearn_steps=2, unlearn_lr=0.02, reg=1.0)
    scores = _iif(model, ihvp="exact", damping=0.05, **kwargs).score(query, train)[0].double()
    influence = InfluenceFunction(model, InfluenceParams(ihvp=IHVPChoice.EXACT, damping=0.05),
                                  FitContext("ols")).score(query, train)[0].double()
    unlearned = unlearn(model, query, train, IntegratedInfluenceParams(**kwargs))
    with torch.no_grad():
        residual = model.module(rows.inputs)[:, 0] - rows.targets[:, 0]
        delta = unlearned.module(rows.inputs)[:, 0] - rows.targets[:, 0]
        query_residual = [float(m.module(query.inputs)[0, 0] - query.targets[0, 0]) for m in (model, unlearned)]
    t_bar = (2 + 1) / (2 * 2)
    factor = (query_residual[1] + t_bar * (query_residual[0] - query_residual[1])) / query_residual[0]
    assert _relative(scores * residual / delta, factor * influence) <= 1e-5


def test_per_sample_rows_equal_each_query_scored_alone(wine_mlp: Trained) -> None:
    """The unlearned baseline depends on the query: per_sample must unlearn each query by
    itself, never the mean of the batch's losses."""
    queries, store = wine_mlp.test_batch([5, 6, 7]), InMemoryArtifacts()
    kwargs: dict[str, Any] = dict(ihvp="exact", steps=2, unlearn_steps=3, unlearn_lr=0.1)
    together = _iif(wine_mlp.adapter, store, **kwargs).score(queries, wine_mlp.train, per_sample=True)
    for q in range(len(queries)):
        alone = _iif(wine_mlp.adapter, store, **kwargs).score(queries.slice(q, q + 1), wine_mlp.train)
        torch.testing.assert_close(together[q], alone[0], rtol=1e-5, atol=1e-7)
    joint = _iif(wine_mlp.adapter, store, **kwargs).score(queries, wine_mlp.train)
    assert _relative(joint[0], together.mean(0)) > 1e-3  # joint unlearning is a different baseline


def test_path_steps_use_the_damping_resolved_at_theta_hat(wine_mlp: Trained) -> None:
    """One damped objective along the path: relative damping is resolved once, at θ̂."""
    queries, store = wine_mlp.test_batch([5]), InMemoryArtifacts()
    kwargs: dict[str, Any] = dict(ihvp="exact", steps=3, unlearn_steps=3, unlearn_lr=0.1)
    method = _iif(wine_mlp.adapter, store, **kwargs)
    relative = method.score(queries, wine_mlp.train)
    damping = method.final_estimator(wine_mlp.train).damping
    explicit = _iif(wine_mlp.adapter, store, damping=damping, **kwargs).score(queries, wine_mlp.train)
    torch.testing.assert_close(relative, explicit, rtol=1e-5, atol=1e-7)
    assert method.context.extras["damping"] == pytest.approx(damping)


def test_prediction_baseline_does_not_depend_on_steps(digits_lr: Trained) -> None:
    queries, store = digits_lr.test_batch([5]), InMemoryArtifacts()
    one = _iif(digits_lr.adapter, store, ihvp="exact", steps=1, baseline="prediction").score(queries, digits_lr.train)
    many = _iif(digits_lr.adapter, store, ihvp="exact", steps=4, baseline="prediction").score(queries, digits_lr.train)
    assert _relative(many, one) <= 1e-5


def test_unlearning_raises_the_query_loss_and_leaves_the_model_untouched(digits_lr: Trained) -> None:
    queries = digits_lr.test_batch([5, 6])
    before = digits_lr.adapter.flat_params().clone()
    params = IntegratedInfluenceParams(unlearn_steps=5, unlearn_lr=0.5, reg=1.0)
    unlearned = unlearn(digits_lr.adapter, queries, digits_lr.train, params)
    with torch.no_grad():
        assert float(unlearned.loss(queries).mean()) > float(digits_lr.adapter.loss(queries).mean())
    torch.testing.assert_close(digits_lr.adapter.flat_params(), before)


def test_unlearned_baseline_scores_are_deterministic(wine_mlp: Trained) -> None:
    queries = wine_mlp.test_batch([5, 6])
    kwargs: dict[str, Any] = dict(ihvp="exact", steps=3, unlearn_steps=3, unlearn_lr=0.1)
    first = _iif(wine_mlp.adapter, **kwargs).score(queries, wine_mlp.train, per_sample=True)
    second = _iif(wine_mlp.adapter, **kwargs).score(queries, wine_mlp.train, per_sample=True)
    assert first.shape == (2, len(wine_mlp.y_train)) and bool(torch.isfinite(first).all())
    torch.testing.assert_close(first, second)


def test_vanishing_unlearning_recovers_the_influence_function(wine_mlp: Trained) -> None:
    """As the unlearning step → 0, θ_u → θ̂ and y' → p: every path step is the IF term."""
    queries = wine_mlp.test_batch([5, 6])
    integrated = _iif(wine_mlp.adapter, ihvp="exact", damping=0.01, steps=2, unlearn_steps=1,
                      unlearn_lr=1e-7).score(queries, wine_mlp.train, per_sample=True)
    influence = InfluenceFunction(wine_mlp.adapter, InfluenceParams(ihvp=IHVPChoice.EXACT, damping=0.01),
                                  FitContext("wine")).score(queries, wine_mlp.train, per_sample=True)
    assert _relative(integrated, influence) <= 1e-3


def test_uniform_baseline_and_regression_unlearning_run() -> None:
    model, train, queries = _regression()
    for baseline in ("uniform", "unlearned"):
        scores = _iif(model, ihvp="exact", damping=0.01, steps=2, baseline=baseline).score(queries, train)
        assert scores.shape == (1, len(train)) and bool(torch.isfinite(scores).all())


def test_self_influence_equals_influence_self_influence(digits_lr: Trained) -> None:
    subset = TensorTrainingSet(digits_lr.x_train[:60], digits_lr.y_train[:60])
    influence = InfluenceFunction(digits_lr.adapter, InfluenceParams(ihvp=IHVPChoice.EXACT, damping=0.01),
                                  FitContext("lr")).self_influence(subset)
    integrated = _iif(digits_lr.adapter, ihvp="exact", damping=0.01).self_influence(subset)
    assert _relative(integrated, influence) <= 1e-5


def test_low_rank_compression_uses_arnoldi(digits_lr: Trained) -> None:
    method = _iif(digits_lr.adapter, rank=8, arnoldi_rank=8, arnoldi_iterations=16, baseline="prediction", steps=1)
    scores = method.score(digits_lr.test_batch([0]), digits_lr.train)
    assert method.context.extras["ihvp"] == "arnoldi" and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize(("raw", "field"), [
    ({"baseline": "zeros"}, "baseline"),
    ({"steps": 0}, "steps"),
    ({"unlearn_lr": 0.0}, "unlearn_lr"),
    ({"rank": 8, "ihvp": "cg"}, "rank"),
    ({"ihvp": "newton"}, "ihvp"),
])
def test_invalid_params_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ParamsError) as error:
        parse_params("integrated_influence", raw)
    assert error.value.field == field
