"""Curvature products and every iHVP estimator against the exact damped inverse.

Problems are tiny (P ≤ 60) so the dense `(G + λI)⁻¹` is the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution.curvature import CurvatureName, CurvatureOperator
from attribution.data import TensorTrainingSet
from attribution.ihvp import LissaDivergenceError, build_estimator
from attribution.model import ModelAdapter
from attribution.tasks import ClassificationTask, RegressionTask


def _problem(task: str, seed: int = 0, rows: int = 200) -> tuple[ModelAdapter, TensorTrainingSet]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=gen)
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    if task == "classification":
        return ModelAdapter(module, ClassificationTask()), TensorTrainingSet(x, torch.randint(0, 3, (rows,), generator=gen))
    return ModelAdapter(module, RegressionTask()), TensorTrainingSet(x, torch.randn(rows, 3, generator=gen))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def damped_problem() -> tuple[CurvatureOperator, TensorTrainingSet, float, torch.Tensor, torch.Tensor]:
    """Classification MLP, damping 5% of the top eigenvalue; returns (op, train, λ, V, exact solution)."""
    model, train = _problem("classification")
    op = CurvatureOperator(model, batch_size=len(train))
    top = float(torch.linalg.eigvalsh(op.dense(train))[-1])
    damping = 0.05 * top
    exact = build_estimator("exact", op, damping)
    exact.fit(train)
    vectors = torch.randn(4, model.num_params, generator=torch.Generator().manual_seed(1))
    return op, train, damping, vectors, exact.solve(vectors)


@pytest.mark.parametrize("kind", list(CurvatureName))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_matvec_matches_dense_for_eager_and_torchscript(kind: CurvatureName, task: str) -> None:
    model, train = _problem(task, rows=40)
    scripted = ModelAdapter(torch.jit.script(model.module), model.task)
    vectors = torch.randn(3, model.num_params, generator=torch.Generator().manual_seed(2))
    dense = CurvatureOperator(model, kind, batch_size=16).dense(train)
    for adapter in (model, scripted):
        op = CurvatureOperator(adapter, kind, batch_size=16)
        assert _relative_error(op.matvec(train, vectors), vectors.double() @ dense) < 1e-5
        assert _relative_error(op.dense(train), dense) < 1e-5
        assert op.trace(train) == pytest.approx(float(dense.trace()), rel=1e-5)


def test_gauss_newton_equals_hessian_for_a_linear_model() -> None:
    """For a model linear in θ the GGN of cross-entropy is the exact Hessian of the mean loss."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 4, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    torch.manual_seed(3)
    layer = nn.Linear(4, 3)
    model = ModelAdapter(layer, ClassificationTask())
    flat = model.flat_params()

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:12].view(3, 4), theta[12:]
        return nn.functional.cross_entropy(x @ w.T + b, y)

    hessian = torch.autograd.functional.hessian(mean_loss, flat)
    ggn = CurvatureOperator(model, batch_size=7).dense(TensorTrainingSet(x, y))
    assert _relative_error(ggn, hessian) < 1e-5


def test_exact_solves_the_damped_system(damped_problem) -> None:
    op, train, damping, vectors, solution = damped_problem
    dense = op.dense(train) + damping * torch.eye(op.num_params, dtype=torch.float64)
    assert _relative_error(solution.double() @ dense, vectors) < 1e-5


def test_exact_refuses_large_models() -> None:
    model, _ = _problem("classification")
    with pytest.raises(ValueError, match="limited to 10 parameters"):
        build_estimator("exact", CurvatureOperator(model), 0.1, exact_max_params=10)


def test_conjugate_gradient_matches_exact(damped_problem) -> None:
    op, train, damping, vectors, solution = damped_problem
    cg = build_estimator("cg", op, damping, cg_tol=1e-6, cg_max_iter=200)
    cg.fit(train)
    assert _relative_error(cg.solve(vectors), solution) <= 1e-3


def test_lissa_matches_exact_with_enough_depth(damped_problem) -> None:
    """Full-batch curvature (batch ≥ N) makes the Neumann recursion deterministic; damping
    20% of the top eigenvalue (condition number ≈ 6) converges in 150 steps. The exact
    reference reuses the fitted eigendecomposition at the new damping (no refit)."""
    op, train, damping, vectors, _ = damped_problem
    exact = build_estimator("exact", op, 4 * damping)
    exact.fit(train)
    lissa = build_estimator("lissa", op, 4 * damping, lissa_depth=150)
    lissa.fit(train)
    assert _relative_error(lissa.solve(vectors), exact.solve(vectors)) <= 1e-2


def test_lissa_with_too_large_a_scale_raises(damped_problem) -> None:
    op, train, damping, vectors, _ = damped_problem
    lissa = build_estimator("lissa", op, damping, lissa_depth=50, lissa_scale=1e3)
    lissa.fit(train)
    with pytest.raises(LissaDivergenceError, match="smaller lissa_scale"):
        lissa.solve(vectors)


def test_arnoldi_with_full_rank_is_exact() -> None:
    """Regression MLP with N·K ≫ P: the GGN is full rank, so the full Krylov basis spans ℝ^P."""
    model, train = _problem("regression")
    op = CurvatureOperator(model, batch_size=200)
    assert float(torch.linalg.eigvalsh(op.dense(train))[0]) > 1e-6
    exact = build_estimator("exact", op, 1e-3)
    exact.fit(train)
    p = model.num_params
    arnoldi = build_estimator("arnoldi", op, 1e-3, arnoldi_rank=p, arnoldi_iterations=p)
    arnoldi.fit(train)
    vectors = torch.randn(3, p, generator=torch.Generator().manual_seed(4))
    assert _relative_error(arnoldi.solve(vectors), exact.solve(vectors)) < 1e-3


def test_arnoldi_low_rank_keeps_the_top_eigenspace(damped_problem) -> None:
    op, train, damping, _, _ = damped_problem
    values, vectors = torch.linalg.eigh(op.dense(train))
    arnoldi = build_estimator("arnoldi", op, damping, arnoldi_rank=5, arnoldi_iterations=25)
    arnoldi.fit(train)
    assert torch.allclose(arnoldi.state["eigenvalues"], values.flip(0)[:5], rtol=1e-4)
    top = vectors[:, -1:].T.float()  # the top eigenvector is inverted exactly
    assert _relative_error(arnoldi.solve(top), top / (values[-1] + damping)) < 1e-3


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_kronecker_estimators_exact_on_a_linear_layer_with_squared_error(name: str) -> None:
    """One nn.Linear under squared error: H_i = 2I, so G = 2I ⊗ E[ããᵀ] = S ⊗ A exactly."""
    gen = torch.Generator().manual_seed(5)
    train = TensorTrainingSet(torch.randn(100, 4, generator=gen), torch.randn(100, 2, generator=gen))
    torch.manual_seed(5)
    op = CurvatureOperator(ModelAdapter(nn.Linear(4, 2), RegressionTask()), batch_size=32)
    exact, kron = build_estimator("exact", op, 0.1), build_estimator(name, op, 0.1)
    exact.fit(train)
    kron.fit(train)
    vectors = torch.randn(3, op.num_params, generator=gen)
    assert _relative_error(kron.solve(vectors), exact.solve(vectors)) < 1e-5


def test_ekfac_is_closer_to_exact_than_kfac(damped_problem) -> None:
    op, train, damping, vectors, solution = damped_problem
    errors = {}
    for name in ("kfac", "ekfac"):
        est = build_estimator(name, op, damping)
        est.fit(train)
        errors[name] = _relative_error(est.solve(vectors), solution)
    assert errors["ekfac"] <= errors["kfac"] + 1e-6
    assert errors["ekfac"] < 0.5


def test_kfac_rejects_torchscript_and_unsupported_layers() -> None:
    model, _ = _problem("classification")
    scripted = ModelAdapter(torch.jit.script(model.module), model.task)
    with pytest.raises(ValueError, match="TorchScript"):
        build_estimator("kfac", CurvatureOperator(scripted), 0.1)
    normed = ModelAdapter(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)), ClassificationTask())
    with pytest.raises(ValueError, match=r"1\.weight"):
        build_estimator("ekfac", CurvatureOperator(normed), 0.1)


def test_kfac_handles_conv2d_and_matches_exact_block_structure() -> None:
    """A Conv2d + Linear classifier fits and gives a damped solve in the right direction."""
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(40, 1, 5, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(6)
    module = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(50, 3))
    op = CurvatureOperator(ModelAdapter(module, ClassificationTask()), batch_size=16)
    train = TensorTrainingSet(x, y)
    damping = 0.1 * float(torch.linalg.eigvalsh(op.dense(train))[-1])
    exact, ekfac = build_estimator("exact", op, damping), build_estimator("ekfac", op, damping)
    exact.fit(train)
    ekfac.fit(train)
    vectors = torch.randn(2, op.num_params, generator=gen)
    cosine = torch.nn.functional.cosine_similarity(ekfac.solve(vectors), exact.solve(vectors))
    assert bool((cosine > 0.8).all())


def test_sampled_factors_are_unbiased_for_classification(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_FACTOR_OUTPUTS one ŷ ∼ p(·|x) per row replaces the exact square root;
    averaged over seeds the sampled GGN approaches the exact one."""
    model, train = _problem("classification", rows=100)
    exact = CurvatureOperator(model, batch_size=100).dense(train)
    monkeypatch.setattr("attribution.curvature.MAX_FACTOR_OUTPUTS", 1)
    sampled = torch.stack([CurvatureOperator(model, batch_size=100, seed=s).dense(train) for s in range(40)])
    assert _relative_error(sampled.mean(0), exact) < 0.1
    assert _relative_error(sampled[0], exact) > 1e-3  # really sampled


def test_sampled_trace_matches_exact_for_a_causal_language_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mean-token loss: the sampled column is scaled by √(counted tokens) so E[a aᵀ] = H."""
    from attribution.tasks import CausalLMTask

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 6, (300, 5), generator=gen)
    tokens[:50, 3:] = -100  # padded rows: fewer counted positions
    torch.manual_seed(7)
    module = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 6))
    model = ModelAdapter(module, CausalLMTask(), layers=["2"])
    train = TensorTrainingSet(tokens.clamp(min=0), tokens)
    exact = CurvatureOperator(model, batch_size=300).trace(train)
    monkeypatch.setattr("attribution.curvature.MAX_FACTOR_OUTPUTS", 1)
    sampled = sum(CurvatureOperator(model, batch_size=300, seed=s).trace(train) for s in range(10)) / 10
    assert sampled == pytest.approx(exact, rel=0.05)
    ekfac = build_estimator("ekfac", CurvatureOperator(model, batch_size=300), 0.1)
    ekfac.fit(train)
    assert bool(torch.isfinite(ekfac.solve(torch.randn(2, model.num_params))).all())
