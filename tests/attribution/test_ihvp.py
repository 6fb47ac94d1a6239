"""Curvature products and every iHVP estimator against the exact damped inverse.

Problems are tiny (P ≤ 60) so the dense `(G + λI)⁻¹` is the reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from attribution.curvature import CurvatureName, CurvatureOperator
from attribution.data import Batch, TensorTrainingSet
from attribution.ihvp import (
    KFACIHVP,
    ArnoldiIHVP,
    BlockDiagonalExactIHVP,
    LissaDivergenceError,
    LissaIHVP,
    build_estimator,
)
from attribution.ihvp.block_exact import layer_index
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
    20% of the top eigenvalue (condition number ≈ 6) converges in 150 steps (`tol=0`: a
    fixed depth). The exact reference is refitted at the new damping."""
    op, train, damping, vectors, _ = damped_problem
    exact = build_estimator("exact", op, 4 * damping)
    exact.fit(train)
    lissa = build_estimator("lissa", op, 4 * damping, lissa_depth=150, lissa_tol=0)
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


def test_kfac_rejects_unsupported_layers() -> None:
    """(TorchScript modules: tests/attribution/test_kfac_scripted.py.)"""
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


# --------------------------------------------------------------------------- adaptive defaults
@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_lissa_stops_once_its_error_bound_meets_tol(damped_problem, tol: float) -> None:
    """Library defaults (scale from the power iteration, depth cap 1000): the full-batch tail
    bound ‖h_∞ − h_j‖ ≤ ‖Δ_j‖(1 − αλ)/(αλ) stops the recursion early with an error ≤ tol."""
    op, train, damping, vectors, solution = damped_problem
    lissa = LissaIHVP(op, damping, tol=tol)
    lissa.fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        solved = lissa.solve(vectors)
    assert lissa.converged and lissa.steps < lissa.required_depth() < 1000
    assert lissa.error_bound <= tol
    assert _relative_error(solved, solution) <= tol


def test_lissa_warns_when_the_depth_cap_stops_it(damped_problem) -> None:
    """A 1000× smaller damping (condition number ≈ 2·10⁴) needs ~10⁵ steps; a cap of 30 warns."""
    op, train, damping, vectors, _ = damped_problem
    lissa = LissaIHVP(op, damping / 1000, depth=30)
    lissa.fit(train)
    with pytest.warns(RuntimeWarning, match="steps would be needed"):
        lissa.solve(vectors)
    assert not lissa.converged and lissa.steps == 30 and lissa.required_depth() > 10_000


def _wider_problem() -> tuple[CurvatureOperator, TensorTrainingSet, torch.Tensor]:
    """6-16-3 tanh classifier (163 parameters) on 200 rows; returns (op, train, per-sample gradients)."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(200, 6, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    torch.manual_seed(8)
    model = ModelAdapter(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), ClassificationTask())
    grads = model.per_sample_grads(Batch(x, y)).double()
    return CurvatureOperator(model, batch_size=200), TensorTrainingSet(x, y), grads


def test_arnoldi_default_adapts_its_krylov_dimension_to_the_damping() -> None:
    """rank=None: a large damping stops at the first check (64 vectors); a 10⁴× smaller one
    grows the space; both give training-gradient scores gᵢᵀ(G + λI)⁻¹gⱼ close to exact."""
    op, train, grads = _wider_problem()
    top = float(torch.linalg.eigvalsh(op.dense(train))[-1])
    sizes = []
    for damping in (0.3 * top, 1e-5 * top):
        exact, arnoldi = build_estimator("exact", op, damping), ArnoldiIHVP(op, damping)
        exact.fit(train)
        arnoldi.fit(train)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the bound is met: no warning
            scores = arnoldi.solve(grads) @ grads.T
        assert arnoldi.error_bound <= 1e-2
        assert _relative_error(scores, exact.solve(grads) @ grads.T) < 1e-2
        sizes.append(arnoldi.state["basis"].shape[0])
    assert sizes[0] == 64 < sizes[1] <= op.num_params


def test_arnoldi_warns_when_solving_below_the_damping_it_was_fitted_for() -> None:
    op, train, grads = _wider_problem()
    arnoldi = build_estimator("arnoldi", op, 1.0)
    arnoldi.fit(train)
    low = build_estimator("arnoldi", op, 1e-8)
    low.load_state(arnoldi.compute_state())
    with pytest.warns(RuntimeWarning, match="dropped effective dimension"):
        low.solve(grads[:2])


# --------------------------------------------------------------------------- block-diagonal reference
def _kronecker_basis_index(op: CurvatureOperator, layer_number: int) -> torch.Tensor:
    """Flat indices of layer l's `[out, in + 1]` matrix `[W | b]` in row-major order (K-FAC's layout)."""
    layer = KFACIHVP(op, 1.0).layers[layer_number]
    idx = torch.arange(op.num_params)
    weight = idx[layer.weight].reshape(layer.out_features, layer.in_features)
    return torch.cat([weight, idx[layer.bias][:, None]], dim=1).reshape(-1)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("activation", [nn.Tanh, nn.Identity])
def test_kronecker_estimators_equal_the_block_diagonal_inverse_for_one_row(
        task: str, activation: type[nn.Module]) -> None:
    """Two Linear layers (tanh, or a linear network), one training row: each layer block is
    `Σ_k g_k g_kᵀ ⊗ ããᵀ = S ⊗ A` exactly, so K-FAC and EK-FAC equal the exact block-diagonal
    damped Gauss-Newton inverse (which differs from the full one: cross-layer curvature)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 5, generator=gen)
    y = torch.randint(0, 3, (1,), generator=gen) if task == "classification" else torch.randn(1, 3, generator=gen)
    torch.manual_seed(9)
    module = nn.Sequential(nn.Linear(5, 4), activation(), nn.Linear(4, 3))
    op = CurvatureOperator(ModelAdapter(module, ClassificationTask() if task == "classification" else RegressionTask()))
    train = TensorTrainingSet(x, y)
    vectors = torch.randn(3, op.num_params, generator=gen, dtype=torch.float64)
    block, full = BlockDiagonalExactIHVP(op, 0.05), build_estimator("exact", op, 0.05)
    block.fit(train)
    full.fit(train)
    reference = block.solve(vectors)
    for name in ("kfac", "ekfac"):
        kron = build_estimator(name, op, 0.05)
        kron.fit(train)
        assert _relative_error(kron.solve(vectors), reference) < 1e-6, name
    assert _relative_error(full.solve(vectors), reference) > 1e-2


def test_block_diagonal_exact_solves_the_layer_blocks_of_the_curvature(damped_problem) -> None:
    op, train, damping, vectors, _ = damped_problem
    dense = op.dense(train)
    mask = torch.zeros_like(dense)
    for index in [layer_index(layer) for layer in KFACIHVP(op, 1.0).layers]:
        mask[index[:, None], index[None, :]] = 1
    block = BlockDiagonalExactIHVP(op, damping)
    block.fit(train)
    system = dense * mask + damping * torch.eye(op.num_params, dtype=torch.float64)
    assert _relative_error(block.solve(vectors.double()) @ system, vectors) < 1e-8


def test_ekfac_eigenvalues_are_the_curvature_diagonal_in_the_kronecker_basis(damped_problem) -> None:
    """The eigenvalue correction Λ*_{oi} = (1/N) Σ_n Σ_k ((Q_Sᵀ DW_nk Q_A)_{oi})² (bias as the
    homogeneous coordinate, Gauss-Newton output factors) is exactly diag(Qᵀ G_ll Q),
    Q = Q_S ⊗ Q_A, on a 200-row problem where K-FAC itself is far from G_ll."""
    op, train, _, _, _ = damped_problem
    ekfac = build_estimator("ekfac", op, 1.0)
    ekfac.fit(train)
    for i in range(2):
        index = _kronecker_basis_index(op, i)
        (block,) = op.dense_blocks(train, [index])
        basis = torch.kron(ekfac.state[f"l{i}.qs"], ekfac.state[f"l{i}.qa"])
        rotated = basis.T @ block @ basis
        fitted = ekfac.state[f"l{i}.lambda"].reshape(-1)
        assert _relative_error(fitted, rotated.diagonal()) < 1e-6
        assert float((rotated - torch.diag(rotated.diagonal())).norm() / rotated.norm()) > 0.05


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", ["exact", "cg", "arnoldi", "kfac", "ekfac", "lissa"])
def test_estimators_keep_float64_precision_for_a_float64_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 model gets float64 solves (also from float32 input) at float64 accuracy, even
    above the size where a float32 model's exact state drops to float32 (patched to 10 here)."""
    monkeypatch.setattr("attribution.ihvp.exact._FLOAT64_MAX_PARAMS", 10)
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(60, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (60,), generator=gen)
    torch.manual_seed(10)
    model = ModelAdapter(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), ClassificationTask())
    op, train = CurvatureOperator(model, batch_size=60), TensorTrainingSet(x, y)
    damping = 0.2 * float(torch.linalg.eigvalsh(op.dense(train))[-1])
    system = op.dense(train) + damping * torch.eye(op.num_params, dtype=torch.float64)
    estimator = build_estimator(name, op, damping, cg_tol=1e-13, cg_max_iter=500, lissa_tol=1e-13,
                                lissa_depth=5000, arnoldi_rank=op.num_params)
    estimator.fit(train)
    vectors = model.per_sample_grads(Batch(x[:2], y[:2]))  # [2, P] float64, in the range of G
    solved = estimator.solve(vectors.float())
    assert solved.dtype == torch.float64 and all(v.dtype == torch.float64 for v in estimator.state.values())
    if name in ("kfac", "ekfac"):  # approximations: precision only
        return
    assert _relative_error(estimator.solve(vectors) @ system, vectors) < 1e-9
