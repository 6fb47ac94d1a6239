"""Influence functions: leave-one-out agreement, caching, sign, shapes, validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attribution.artifacts import InMemoryArtifacts
from attribution.data import TensorTrainingSet
from attribution.ihvp.exact import ExactIHVP
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.influence import IHVPChoice, InfluenceFunction, InfluenceParams
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from tests.attribution.fixtures import Leakage, Trained


def _method(trained: Trained, store: InMemoryArtifacts | None = None, **params: object) -> InfluenceFunction:
    return InfluenceFunction(trained.adapter, InfluenceParams(**params), FitContext("digits", store))  # type: ignore[arg-type]


def _retrain_loss(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float,
                  x_q: torch.Tensor, y_q: torch.Tensor) -> float:
    """Warm-started float64 L-BFGS on mean CE + (l2/2)‖θ‖²; returns the query loss."""
    opt = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=100, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y) + 0.5 * l2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(F.cross_entropy(module(x_q), y_q))


def test_exact_influence_matches_leave_one_out_retraining(digits_lr: Trained) -> None:
    """Removing row i raises the query loss by ≈ score_i / N (damping = the training L2)."""
    x, y = digits_lr.x_train.double(), digits_lr.y_train
    with torch.no_grad():
        losses = F.cross_entropy(digits_lr.module(digits_lr.x_test), digits_lr.y_test, reduction="none")
    query = int(losses.argmax())
    scores = _method(digits_lr, ihvp="exact", damping=digits_lr.l2).score(digits_lr.test_batch([query]),
                                                                           digits_lr.train)[0]
    removed = torch.cat([scores.argsort(descending=True)[:16], scores.argsort()[:16]])
    full = copy.deepcopy(digits_lr.module).double()
    x_q, y_q = digits_lr.x_test[query: query + 1].double(), digits_lr.y_test[query: query + 1]
    base = _retrain_loss(full, x, y, digits_lr.l2, x_q, y_q)
    actual = []
    for i in removed.tolist():
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[i] = False
        actual.append(_retrain_loss(copy.deepcopy(full), x[keep], y[keep], digits_lr.l2, x_q, y_q) - base)
    predicted = scores[removed].double() / len(y)
    pearson = float(torch.corrcoef(torch.stack([predicted, torch.tensor(actual, dtype=torch.float64)]))[0, 1])
    print(f"LOO Pearson over {len(removed)} rows: {pearson:.4f}")
    assert pearson >= 0.95


def test_fit_is_cached_across_queries_and_dampings(digits_lr: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = ExactIHVP.compute_state
    def counted(self: ExactIHVP) -> dict[str, torch.Tensor]:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(ExactIHVP, "compute_state", counted)
    store = InMemoryArtifacts()
    first = _method(digits_lr, store, ihvp="exact")
    first.score(digits_lr.test_batch([0]), digits_lr.train)
    assert first.context.extras["ihvp_fit_cached"] is False
    assert "ihvp_fit" in first.context.timings
    for damping in (None, 0.5):
        again = _method(digits_lr, store, ihvp="exact", damping=damping)
        again.score(digits_lr.test_batch([1, 2]), digits_lr.train)
        assert again.context.extras["ihvp_fit_cached"] is True
    assert len(calls) == 1


def test_default_damping_is_relative_to_the_mean_eigenvalue(digits_lr: Trained) -> None:
    method = _method(digits_lr)
    method.fit(digits_lr.train)
    trace = method.estimator(digits_lr.train).state["eigenvalues"].sum()
    assert method.context.extras["ihvp"] == "exact"  # auto: P = 650 fits the dense inverse
    assert method.context.extras["damping"] == pytest.approx(0.01 * float(trace) / 650, rel=1e-4)


def test_shapes_joint_is_the_mean_of_per_sample_and_deterministic(digits_lr: Trained) -> None:
    queries, store = digits_lr.test_batch([3, 4, 5]), InMemoryArtifacts()
    method = _method(digits_lr, store, ihvp="exact")
    per_sample = method.score(queries, digits_lr.train, per_sample=True)
    joint = method.score(queries, digits_lr.train)
    assert per_sample.shape == (3, len(digits_lr.y_train)) and per_sample.dtype == torch.float32
    assert joint.shape == (1, len(digits_lr.y_train)) and joint.dtype == torch.float32
    torch.testing.assert_close(joint[0], per_sample.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_method(digits_lr, store, ihvp="exact").score(queries, digits_lr.train), joint)


def test_a_duplicate_of_the_query_has_a_positive_score(digits_leakage: Leakage) -> None:
    """Also records how often raw exact IF ranks the planted copy first (low: raw scores are
    dominated by rows with large gradients — the reason for relative normalisation)."""
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    scores = _method(trained, ihvp="exact", damping=trained.l2).score(queries, trained.train, per_sample=True)
    copies = scores[torch.arange(len(queries)), digits_leakage.copy_index]
    assert bool((copies > 0).all())
    top1 = int((scores.argmax(1) == digits_leakage.copy_index).sum())
    print(f"raw exact IF ranks the planted copy first for {top1}/{len(queries)} queries")


def test_self_influence_is_the_diagonal_of_train_to_train_scores(digits_lr: Trained) -> None:
    rows = torch.arange(0, 40)
    as_queries = digits_lr.train.rows(rows)
    subset = TensorTrainingSet(digits_lr.x_train[rows], digits_lr.y_train[rows])
    method = _method(digits_lr, ihvp="exact")
    method.fit(digits_lr.train)
    diagonal = method.score(as_queries, subset, per_sample=True).diagonal()
    torch.testing.assert_close(method.self_influence(subset), diagonal, rtol=1e-4, atol=1e-6)
    few = TensorTrainingSet(digits_lr.x_train[:6], digits_lr.y_train[:6])
    cg = _method(digits_lr, ihvp="cg", damping=method.context.extras["damping"], cg_tol=1e-6)
    cg.fit(digits_lr.train)  # curvature over all rows, self-influence of a block of six
    torch.testing.assert_close(cg.self_influence(few), diagonal[:6], rtol=1e-3, atol=1e-5)


def test_torchscript_model_gives_the_eager_scores(digits_lr: Trained) -> None:
    scripted = ModelAdapter(torch.jit.script(copy.deepcopy(digits_lr.module)), digits_lr.adapter.task)
    queries = digits_lr.test_batch([7])
    eager = _method(digits_lr, ihvp="exact", damping=0.01).score(queries, digits_lr.train)
    script = InfluenceFunction(scripted, InfluenceParams(ihvp=IHVPChoice.CG, damping=0.01, cg_tol=1e-6),
                               FitContext("script")).score(queries, digits_lr.train)
    torch.testing.assert_close(script, eager, rtol=1e-3, atol=1e-3 * float(eager.abs().max()))


def test_layers_restrict_the_tracked_parameters_and_progress_is_reported(digits_mlp: Trained) -> None:
    seen: list[float] = []
    method = InfluenceFunction(digits_mlp.adapter, InfluenceParams(ihvp=IHVPChoice.EKFAC, layers=("2",)),
                               FitContext("mlp", progress=seen.append))
    scores = method.score(digits_mlp.test_batch([0, 1]), digits_mlp.train, per_sample=True)
    assert method.tracked.param_names == ["2.weight", "2.bias"]
    assert scores.shape == (2, len(digits_mlp.y_train)) and bool(torch.isfinite(scores).all())
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)


@pytest.mark.parametrize(("raw", "field"), [
    ({"ihvp": "newton"}, "ihvp"),
    ({"curvature": "diagonal"}, "curvature"),
    ({"damping": -1.0}, "damping"),
    ({"arnoldi_rank": 64, "arnoldi_iterations": 10}, "arnoldi_iterations"),
    ({"fit_rows": 0}, "fit_rows"),
    ({"lissa_scale": 0}, "lissa_scale"),
    ({"layers": [""]}, "layers"),
])
def test_invalid_params_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ParamsError) as error:
        parse_params("influence", raw)
    assert error.value.field == field
