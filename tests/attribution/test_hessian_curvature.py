"""The full-Hessian curvature (`curvature="hessian"`): products, dense matrix, blocks and trace
against `torch.autograd.functional.hessian` of the mean loss (eager and TorchScript), the
influence function and Newton-step Forward-INF against `(H + λI)⁻¹` formed by hand, CG and
Arnoldi against the exact inverse, and the errors for indefinite damped Hessians and for the
estimators that cannot use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import attribution.curvature as curvature_module
from attribution.artifacts import InMemoryArtifacts
from attribution.curvature import CurvatureName, CurvatureOperator
from attribution.data import Batch, TensorTrainingSet
from attribution.ihvp import NotPositiveDefiniteError, build_estimator
from attribution.ihvp.block_exact import BlockDiagonalExactIHVP, layer_index
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf import ForwardInfParams
from attribution.methods.influence import InfluenceParams, resolve_ihvp
from attribution.methods.integrated_influence import IntegratedInfluenceParams
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask

ROWS = 48
L2 = 1e-2


@dataclass
class Problem:
    """A float64 5-12-3 tanh MLP (111 parameters) on 48 rows of three Gaussian blobs, with
    independent references: the autograd Hessian of the mean cross-entropy and per-sample
    gradients by `vmap(grad)`."""

    module: nn.Module
    x: Tensor  # [N, 5]
    y: Tensor  # [N]
    queries: Batch

    @property
    def model(self) -> ModelAdapter:
        return ModelAdapter(self.module, ClassificationTask())

    @property
    def train(self) -> TensorTrainingSet:
        return TensorTrainingSet(self.x, self.y)

    def _params(self, theta: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, p in self.module.named_parameters():
            out[name] = theta[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    def flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def hessian(self, rows: int = ROWS) -> Tensor:
        """`[P, P]` Hessian of the mean cross-entropy over the first `rows` rows."""
        x, y = self.x[:rows], self.y[:rows]

        def mean_loss(theta: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(self.module, self._params(theta), (x,)), y)

        return torch.autograd.functional.hessian(mean_loss, self.flat())

    def grads(self, x: Tensor, y: Tensor) -> Tensor:
        """`[B, P]` per-sample cross-entropy gradients."""
        def loss(theta: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(self.module, self._params(theta), (xi[None],)), yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(self.flat(), x, y)

    def influence(self, damping: float) -> Tensor:
        """`[Q, N]` `∇L_qᵀ (H + λI)⁻¹ ∇ℓ_i` by hand."""
        damped = self.hessian() + damping * torch.eye(len(self.flat()), dtype=torch.float64)
        query_grads = self.grads(self.queries.inputs, self.queries.targets)  # type: ignore[arg-type]
        return torch.linalg.solve(damped, query_grads.T).T @ self.grads(self.x, self.y).T


def _blobs(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (ROWS + 3,), generator=gen)
    return centers[y] + torch.randn(ROWS + 3, 5, generator=gen, dtype=torch.float64), y


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _problem(module: nn.Module) -> Problem:
    x, y = _blobs()
    return Problem(module.eval(), x[:ROWS], y[:ROWS], Batch(x[ROWS:], y[ROWS:]))


@pytest.fixture(scope="module")
def trained() -> Problem:
    """Minimiser of mean CE + (L2/2)‖θ‖² (L-BFGS): `H + L2·I` is that objective's Hessian,
    positive definite there, although H itself need not be."""
    x, y = _blobs()
    module = _mlp()
    optimizer = torch.optim.LBFGS(module.parameters(), lr=1.0, max_iter=2000, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(module(x[:ROWS]), y[:ROWS]) + 0.5 * L2 * sum((p**2).sum() for p in module.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return _problem(module)


@pytest.fixture(scope="module")
def untrained() -> Problem:
    return _problem(_mlp(seed=1))


def _relative_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _influence(problem: Problem, **params: Any) -> Tensor:
    return attribute(problem.model, "influence", {"curvature": "hessian", "normalize": "none", **params}, problem.train,
                     FitContext("hessian", store=InMemoryArtifacts()), queries=problem.queries, per_sample=True)


# --------------------------------------------------------------------------- curvature
def test_products_dense_blocks_and_trace_equal_the_autograd_hessian(untrained: Problem) -> None:
    """Away from a minimum (H indefinite), in batches of 16, for eager and TorchScript modules."""
    reference = untrained.hessian()
    assert float(torch.linalg.eigvalsh(reference)[0]) < 0  # the products do not rely on H ⪰ 0
    scripted = ModelAdapter(torch.jit.script(untrained.module), ClassificationTask())
    vectors = torch.randn(5, len(reference), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    blocks = [layer_index(layer) for layer in BlockDiagonalExactIHVP(
        CurvatureOperator(untrained.model), 1.0).layers]
    for model in (untrained.model, scripted, scripted):  # the second scripted run uses the JIT-optimised graph
        op = CurvatureOperator(model, CurvatureName.HESSIAN, batch_size=16)
        assert not op.positive_semidefinite
        assert _relative_error(op.matvec(untrained.train, vectors), vectors @ reference) < 1e-12
        dense = op.dense(untrained.train)
        assert _relative_error(dense, reference) < 1e-12 and torch.equal(dense, dense.T)
        for block, index in zip(op.dense_blocks(untrained.train, blocks), blocks, strict=True):
            assert _relative_error(block, reference[index][:, index]) < 1e-12
        assert op.trace(untrained.train) == pytest.approx(float(reference.trace()), rel=1e-12)


def test_max_rows_caps_the_hessian_to_the_first_rows(untrained: Problem) -> None:
    op = CurvatureOperator(untrained.model, CurvatureName.HESSIAN, batch_size=16, max_rows=20)
    assert _relative_error(op.dense(untrained.train), untrained.hessian(rows=20)) < 1e-12


def test_hutchinson_trace_is_seeded_and_within_four_standard_deviations(
    untrained: Problem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `EXACT_TRACE_MAX_PARAMS` the trace is a Rademacher estimate with variance
    `2 Σ_{j≠k} H_jk² / S` (S probes)."""
    monkeypatch.setattr(curvature_module, "EXACT_TRACE_MAX_PARAMS", 10)
    reference = untrained.hessian()
    off_diagonal = reference - torch.diag(torch.diag(reference))
    std = float((2 * off_diagonal.pow(2).sum() / curvature_module.HUTCHINSON_PROBES).sqrt())
    estimates = [CurvatureOperator(untrained.model, CurvatureName.HESSIAN, seed=seed).trace(untrained.train)
                 for seed in (0, 0, 1)]
    assert estimates[0] == estimates[1] != estimates[2]
    for estimate in estimates:
        assert abs(estimate - float(reference.trace())) < 4 * std


def test_factorisations_are_refused(untrained: Problem) -> None:
    op = CurvatureOperator(untrained.model, CurvatureName.HESSIAN)
    batch = untrained.train.batches(8).__next__()[1]
    with pytest.raises(ValueError, match="indefinite and has no pseudo-gradients"):
        op.pseudo_gradients(batch)
    outputs = untrained.model.module(batch.inputs)
    with pytest.raises(ValueError, match="indefinite and has no output-Hessian square-root factors"):
        op.output_factors(outputs, batch.targets)


# --------------------------------------------------------------------------- inverses
def test_influence_with_the_exact_hessian_inverse_equals_the_formula(trained: Problem) -> None:
    expected = trained.influence(L2)
    scores = _influence(trained, ihvp="exact", damping=L2)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    gauss_newton = _influence(trained, curvature="gauss_newton", ihvp="exact", damping=L2)
    assert _relative_error(gauss_newton, expected) > 1e-3  # the Hessian, not the GGN, was used


def test_cg_and_full_rank_arnoldi_match_the_exact_inverse(trained: Problem) -> None:
    exact = _influence(trained, ihvp="exact", damping=L2)
    cg = _influence(trained, ihvp="cg", damping=L2, cg_tol=1e-10, cg_max_iter=1000)
    adaptive = _influence(trained, ihvp="arnoldi", damping=L2)  # Hessian: the full Krylov space (P ≤ 1024)
    full = _influence(trained, ihvp="arnoldi", damping=L2, arnoldi_rank=111, arnoldi_iterations=111)
    for scores in (cg, adaptive, full):
        assert _relative_error(scores, exact) < 1e-5


def test_arnoldi_keeps_eigenvalues_by_magnitude(untrained: Problem) -> None:
    """H indefinite (μ from −2.13 to 2.22), λ above |μ_min|: the top 5 Ritz pairs of a full Krylov
    space are the 5 largest |μ|, negative ones included (sorted by value they would all be positive)."""
    values = torch.linalg.eigvalsh(untrained.hessian())
    op = CurvatureOperator(untrained.model, CurvatureName.HESSIAN)
    arnoldi = build_estimator("arnoldi", op, 2 * float(-values[0]), arnoldi_rank=5, arnoldi_iterations=len(values))
    arnoldi.fit(untrained.train)
    kept = arnoldi.state["eigenvalues"]
    expected = values[values.abs().argsort(descending=True)[:5]]
    assert int((expected < 0).sum()) >= 2
    torch.testing.assert_close(kept.sort().values, expected.sort().values, rtol=0, atol=1e-10)


def test_forward_inf_newton_step_with_the_hessian_equals_the_first_order_form(trained: Problem) -> None:
    """score_i ≈ α ∇ℓᵢᵀ(H + λI)⁻¹∇L_q: a literal small step, and the default finite difference
    rescaled to α = 1/N."""
    expected = trained.influence(L2)
    params = {"unlearning": "newton", "curvature": "hessian", "ihvp": "exact", "damping": L2, "normalize": "none"}
    context = FitContext("newton-hessian", store=InMemoryArtifacts())
    literal = attribute(trained.model, "forward_inf", {**params, "lr": 1e-6}, trained.train, context,
                        queries=trained.queries, per_sample=True)
    torch.testing.assert_close(literal.double(), 1e-6 * expected, rtol=0, atol=2e-3 * 1e-6 * float(expected.abs().max()))
    default = attribute(trained.model, "forward_inf", params, trained.train, context, queries=trained.queries,
                        per_sample=True)
    torch.testing.assert_close(default.double(), expected / ROWS, rtol=0,
                               atol=1e-2 * float(expected.abs().max()) / ROWS)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ihvp", ["exact", "cg", "arnoldi"])
def test_an_indefinite_damped_hessian_raises_a_clear_error(untrained: Problem, ihvp: str) -> None:
    assert float(torch.linalg.eigvalsh(untrained.hessian())[0]) < -1e-6
    with pytest.raises(NotPositiveDefiniteError, match=r"not positive definite.*raise `damping` or use curvature "
                                                       "gauss_newton"):
        _influence(untrained, ihvp=ihvp, damping=1e-6)


def test_estimators_that_need_a_positive_semidefinite_curvature_refuse_the_hessian(untrained: Problem) -> None:
    op = CurvatureOperator(untrained.model, CurvatureName.HESSIAN)
    for ihvp, message in (("kfac", "K-FAC/EK-FAC factor the Gauss-Newton"), ("ekfac", "K-FAC/EK-FAC factor"),
                          ("lissa", "LiSSA needs a positive semi-definite curvature")):
        with pytest.raises(ValueError, match=message):
            build_estimator(ihvp, op, 1.0)


@pytest.mark.parametrize("params_type", [InfluenceParams, IntegratedInfluenceParams, ForwardInfParams])
@pytest.mark.parametrize("ihvp", ["kfac", "ekfac", "lissa"])
def test_params_reject_hessian_with_factor_and_neumann_estimators(params_type: type, ihvp: str) -> None:
    extra = {"unlearning": "newton"} if params_type is ForwardInfParams else {}
    with pytest.raises(ParamsError, match=f"params.curvature: hessian does not work with ihvp {ihvp}") as error:
        params_type.parse({"curvature": "hessian", "ihvp": ihvp, **extra})
    assert error.value.field == "curvature"
    for ok in ("auto", "exact", "cg", "arnoldi"):
        params_type.parse({"curvature": "hessian", "ihvp": ok, **extra})


def test_auto_never_picks_a_kronecker_estimator_for_the_hessian(untrained: Problem) -> None:
    small = {"exact_max_params": 10}
    assert resolve_ihvp(untrained.model, InfluenceParams.parse(small)).value == "ekfac"
    assert resolve_ihvp(untrained.model, InfluenceParams.parse({**small, "curvature": "hessian"})).value == "cg"
    assert resolve_ihvp(untrained.model, InfluenceParams.parse({"curvature": "hessian"})).value == "exact"
