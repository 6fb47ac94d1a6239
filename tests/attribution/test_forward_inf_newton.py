"""Forward-INF with Newton-step unlearning (`unlearning="newton"`): against the influence
function computed independently (closed-form logistic-regression gradients, autograd Hessian,
dense inverse), against exact refits with the query added, per-sample vs joint, TorchScript,
RelatIF, self-influence, the shared iHVP cache and parameter validation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.evaluation import leakage_detection, pearson
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf import ForwardInf, ForwardInfParams
from attribution.methods.forward_inf_newton import STEP_FRACTION
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.tasks import ClassificationTask
from tests.attribution import fixtures

NEWTON: dict[str, Any] = {"unlearning": "newton", "ihvp": "exact", "normalize": "none"}  # raw unless a test says


class ExactLR:
    """A float64 multinomial logistic regression θ = [W | b] with closed-form per-sample
    gradients gᵢ = (pᵢ − e_yᵢ) ⊗ [xᵢ, 1] and the autograd Hessian of R(θ) = mean CE + (l2/2)‖θ‖²."""

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor, l2: float) -> None:
        if not isinstance(module, nn.Linear):
            raise TypeError("ExactLR wraps an nn.Linear")
        self.module = copy.deepcopy(module).double()
        self.x, self.y, self.l2 = x.double(), y, l2

    def flat(self) -> Tensor:
        return torch.cat([self.module.weight.detach().reshape(-1), self.module.bias.detach()])

    def _split(self, theta: Tensor) -> dict[str, Tensor]:
        k, d = self.module.weight.shape
        return {"weight": theta[: k * d].view(k, d), "bias": theta[k * d:]}

    def losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.module, self._split(theta), (x,)), y, reduction="none")

    def grads(self, x: Tensor, y: Tensor) -> Tensor:
        """`[B, P]` per-sample gradients at θ̂ in the (weight row-major, bias) order."""
        with torch.no_grad():
            residual = self.module(x.double()).softmax(1) - F.one_hot(y, self.module.out_features).double()
        weight = residual[:, :, None] * x.double()[:, None, :]
        return torch.cat([weight.reshape(len(x), -1), residual], dim=1)

    def objective(self, theta: Tensor, query: Batch | None = None) -> Tensor:
        """R(θ) = (1/N)(Σᵢ L(θ, zᵢ) + Σ_q L(θ, z_q)) + (l2/2)‖θ‖²: the queries, if any, added
        with the weight 1/N of one training row (Koh & Liang's upweighting by ε = 1/N)."""
        total = self.losses(theta, self.x, self.y).sum()
        if query is not None:
            total = total + self.losses(theta, query.inputs, query.targets).sum()  # type: ignore[arg-type]
        return total / len(self.y) + 0.5 * self.l2 * (theta**2).sum()

    def ce_hessian(self) -> Tensor:
        """`[P, P]` Hessian of the mean cross-entropy (= its Gauss-Newton matrix for a linear model)."""
        theta = self.flat()
        return torch.autograd.functional.hessian(lambda t: self.losses(t, self.x, self.y).mean(), theta,
                                                 vectorize=True)

    def refit(self, query: Batch | None = None, tol: float = 1e-12) -> Tensor:
        """argmin of `objective` by Newton's method from θ̂ (strictly convex: l2 > 0)."""
        theta = self.flat()
        for _ in range(30):
            g = torch.func.grad(self.objective)(theta, query)
            if float(g.abs().max()) <= tol:
                return theta
            h = torch.autograd.functional.hessian(lambda t: self.objective(t, query), theta, vectorize=True)
            theta = theta - torch.linalg.solve(h, g)
        raise AssertionError("Newton refit did not converge")


def influence_reference(model: ExactLR, queries: Batch, damping: float) -> Tensor:
    """`[Q, N]` gᵢᵀ (G + λI)⁻¹ g_q from independent gradients and Hessian."""
    curvature = model.ce_hessian()
    inverse = torch.linalg.inv(curvature + damping * torch.eye(len(curvature), dtype=torch.float64))
    return model.grads(queries.inputs, queries.targets) @ inverse @ model.grads(model.x, model.y).T  # type: ignore[arg-type]


def newton_scores(module: nn.Module, train: TensorTrainingSet, queries: Batch, *, per_sample: bool = True,
                  store: InMemoryArtifacts | None = None, context: FitContext | None = None,
                  **params: Any) -> Tensor:
    context = context or FitContext("newton", store=store)
    return attribute(ModelAdapter(module, ClassificationTask()), ForwardInf, {**NEWTON, **params}, train, context,
                     queries=queries, per_sample=per_sample)


def test_newton_scores_equal_the_influence_function_to_first_order(digits_lr: fixtures.Trained) -> None:
    """score_i = L(θ̂ + α s_q, zᵢ) − L(θ̂, zᵢ) = α gᵢᵀ(G + λI)⁻¹g_q + O(α²): tight for a small
    literal α, and the default (finite-difference step of length ρ‖θ̂‖ rescaled to α = 1/N)
    estimates (1/N) gᵢᵀ(G + λI)⁻¹g_q in its own units."""
    t, damping = digits_lr, digits_lr.l2
    queries = t.test_batch([0, 3, 7])
    reference = influence_reference(ExactLR(t.module, t.x_train, t.y_train, t.l2), queries, damping)
    store = InMemoryArtifacts()
    literal = newton_scores(t.module, t.train, queries, store=store, damping=damping, lr=1e-5, precision="fp64")
    torch.testing.assert_close(literal.double(), 1e-5 * reference, atol=2e-3 * 1e-5 * float(reference.abs().max()),
                               rtol=0)
    default = newton_scores(t.module, t.train, queries, store=store, damping=damping, precision="fp64")
    expected = reference / len(t.y_train)
    torch.testing.assert_close(default.double(), expected, atol=1e-2 * float(expected.abs().max()), rtol=0)
    in_fp32 = newton_scores(t.module, t.train, queries, store=store, damping=damping)
    for q in range(len(queries)):
        assert pearson(in_fp32[q], expected[q].float()) > 0.9999


def test_descent_flips_the_step_and_agrees(digits_lr: fixtures.Trained) -> None:
    queries = digits_lr.test_batch([4])
    ascent = newton_scores(digits_lr.module, digits_lr.train, queries, precision="fp64")
    descent = newton_scores(digits_lr.module, digits_lr.train, queries, precision="fp64", direction="descent")
    assert ascent.abs().max() > 0
    torch.testing.assert_close(ascent, descent, atol=2e-2 * float(ascent.abs().max()), rtol=0)


@pytest.mark.slow
def test_newton_tracks_the_exact_refit_test_to_train_influence(digits_lr: fixtures.Trained) -> None:
    """Exact test→train influence L(θ̂, zᵢ) − L(θ₊q, zᵢ), θ₊q the Newton-converged minimiser of
    the objective with the query added at the weight 1/N of a training row, on a strictly
    convex model (digits LR, refitted to float64 convergence first). The Newton-step scores
    (default α = 1/N; exact iHVP with λ = l2, the objective's own Hessian) track it in its own
    units; Algorithm 1 (plain gradient ascent) does not (printed)."""
    t = digits_lr
    lr = ExactLR(t.module, t.x_train, t.y_train, t.l2)
    with torch.no_grad():  # θ̂ to float64 convergence (the fixture's float32 L-BFGS stops earlier)
        theta = lr.refit()
        lr.module.weight.copy_(theta[:-10].view(10, 64))
        lr.module.bias.copy_(theta[-10:])
    train = TensorTrainingSet(lr.x, lr.y)
    store = InMemoryArtifacts()
    for q in (0, 1, 2, 3):
        query = Batch(t.x_test[q: q + 1].double(), t.y_test[q: q + 1])
        exact = lr.losses(theta, lr.x, lr.y) - lr.losses(lr.refit(query), lr.x, lr.y)
        newton = newton_scores(lr.module, train, query, store=store, damping=t.l2)[0]
        plain = attribute(ModelAdapter(lr.module, ClassificationTask()), ForwardInf, {"steps": 5, "lr": 0.01},
                          train, FitContext("plain", store=store), queries=query)[0]
        ratio = float(newton.double() @ exact / (exact @ exact))
        print(f"\nquery {q}: Pearson with the exact refit: Newton {pearson(newton, exact.float()):.5f}, "
              f"Algorithm 1 {pearson(plain, exact.float()):.4f}; Newton scale ratio {ratio:.3f}")
        assert pearson(newton, exact.float()) >= 0.99
        assert 0.8 <= ratio <= 1.25  # an estimate of the refit's loss changes, not only a correlate


@pytest.mark.parametrize("ihvp", ["exact", "cg"])
def test_per_sample_equals_separate_joint_queries(wine_mlp: fixtures.Trained, ihvp: str) -> None:
    """Per-sample rows equal one joint query each (eager vmap and TorchScript copies); a joint
    query of Q samples uses α = Q/N on their mean loss gradient: the sum of the per-sample
    first-order scores."""
    queries = wine_mlp.test_batch([1, 2, 5, 11])
    store = InMemoryArtifacts()
    params: dict[str, Any] = {"ihvp": ihvp, "damping": 1e-3, "precision": "fp64"}
    batched = newton_scores(wine_mlp.module, wine_mlp.train, queries, store=store, **params)
    scripted = torch.jit.script(copy.deepcopy(wine_mlp.module))
    batched_scripted = newton_scores(scripted, wine_mlp.train, queries, store=store, **params)
    for q in range(len(queries)):
        single = newton_scores(wine_mlp.module, wine_mlp.train, queries.slice(q, q + 1), per_sample=False,
                               store=store, **params)[0]
        torch.testing.assert_close(batched[q], single, atol=1e-6 * float(single.abs().max()), rtol=1e-4)
        torch.testing.assert_close(batched_scripted[q], single, atol=1e-5 * float(single.abs().max()), rtol=1e-4)
    joint = newton_scores(wine_mlp.module, wine_mlp.train, queries, per_sample=False, store=store, **params)[0]
    total = batched.sum(0)
    torch.testing.assert_close(joint, total, atol=2e-2 * float(total.abs().max()), rtol=0)


def test_torchscript_and_estimator_support(wine_mlp: fixtures.Trained) -> None:
    scripted = torch.jit.script(copy.deepcopy(wine_mlp.module))
    queries = wine_mlp.test_batch([0])
    eager = newton_scores(wine_mlp.module, wine_mlp.train, queries, ihvp="cg", damping=1e-3)
    script = newton_scores(scripted, wine_mlp.train, queries, ihvp="cg", damping=1e-3)
    torch.testing.assert_close(script, eager, atol=1e-3 * float(eager.abs().max()), rtol=0)  # fp32 loss rounding
    auto = FitContext("auto-scripted")
    script = newton_scores(scripted, wine_mlp.train, queries, context=auto, ihvp="auto", exact_max_params=10)
    assert auto.extras["ihvp"] == "ekfac"  # TorchScript linear layers: factored from per-sample gradients
    eager = newton_scores(wine_mlp.module, wine_mlp.train, queries, ihvp="ekfac")
    torch.testing.assert_close(script, eager, atol=1e-3 * float(eager.abs().max()), rtol=0)


@pytest.mark.parametrize("layers", [[], ["4"]])
def test_newton_equals_lr_times_the_influence_method(wine_mlp: fixtures.Trained, layers: list[str]) -> None:
    """On a non-convex MLP (and on its last layer only): L(θ̂ + α s_q) − L(θ̂) ≈ α × the influence
    method's score ∇L_qᵀ(G + λI)⁻¹∇Lᵢ with the same estimator, damping and tracked layers."""
    queries = wine_mlp.test_batch([3, 8])
    params: dict[str, Any] = {"ihvp": "exact", "damping": 1e-2, "layers": layers, "normalize": "none"}
    newton = newton_scores(wine_mlp.module, wine_mlp.train, queries, lr=1e-6, precision="fp64", **params)
    influence = attribute(wine_mlp.adapter, "influence", params, wine_mlp.train, FitContext("if"), queries=queries,
                          per_sample=True)
    torch.testing.assert_close(newton.double(), 1e-6 * influence.double(),
                               atol=1e-3 * 1e-6 * float(influence.abs().max()), rtol=0)


def test_the_iHVP_fit_is_shared_with_the_influence_method(wine_mlp: fixtures.Trained) -> None:
    store = InMemoryArtifacts()
    adapter = ModelAdapter(wine_mlp.module, ClassificationTask())
    attribute(adapter, "influence", {"ihvp": "arnoldi", "arnoldi_rank": 20, "arnoldi_iterations": 40},
              wine_mlp.train, FitContext("shared", store=store), queries=wine_mlp.test_batch([0]))
    context = FitContext("shared", store=store)
    newton_scores(wine_mlp.module, wine_mlp.train, wine_mlp.test_batch([1]), context=context,
                  ihvp="arnoldi", arnoldi_rank=20, arnoldi_iterations=40)
    assert context.extras["ihvp_fit_cached"] is True and context.extras["ihvp"] == "arnoldi"
    assert {"unlearn_s", "sweep_s", "newton_alpha", "newton_step_fraction"} <= {*context.timings, *context.extras}
    assert context.extras["newton_step_fraction"] == pytest.approx(STEP_FRACTION)
    assert context.extras["newton_alpha"] == pytest.approx(1 / len(wine_mlp.y_train))


def test_relative_scores_and_self_influence(digits_lr: fixtures.Trained) -> None:
    """RelatIF divides by Dᵢ = sqrt(α gᵢᵀ(G + λI)⁻¹gᵢ); self-influence is each row's own loss
    change under the Newton step on itself (≈ the same α gᵢᵀ(G + λI)⁻¹gᵢ), or that value
    itself in `gradient_norm` mode."""
    t = digits_lr
    train = TensorTrainingSet(t.x_train[:300], t.y_train[:300])
    model = ExactLR(t.module, t.x_train[:300], t.y_train[:300], t.l2)
    grads = model.grads(model.x, model.y)
    inverse = torch.linalg.inv(model.ce_hessian() + t.l2 * torch.eye(grads.shape[1], dtype=torch.float64))
    own = ((grads @ inverse) * grads).sum(1) / len(train)  # α = 1/N
    store = InMemoryArtifacts()
    queries = t.test_batch([2, 9])
    params: dict[str, Any] = {"damping": t.l2, "precision": "fp64"}
    raw = newton_scores(t.module, train, queries, store=store, **params)
    relative = newton_scores(t.module, train, queries, store=store, normalize="relative", **params)
    torch.testing.assert_close(relative.double(), raw.double() / own.sqrt(), atol=1e-6, rtol=1e-4)
    adapter = ModelAdapter(t.module, ClassificationTask())
    for mode, tolerance in (("gradient_norm", 1e-4), ("unlearn", 2e-2)):
        method = ForwardInf(adapter, ForwardInfParams.parse({**NEWTON, **params, "self_influence_mode": mode}),
                            FitContext("self", store=store))
        torch.testing.assert_close(method.self_influence(train).double(), own,
                                   atol=tolerance * float(own.max()), rtol=tolerance)


def test_relative_newton_ranks_every_copy_first(digits_leakage: fixtures.Leakage) -> None:
    t = digits_leakage.trained
    context = FitContext("leak-newton", store=InMemoryArtifacts())
    scores = attribute(ModelAdapter(t.module, ClassificationTask()), ForwardInf,
                       {"unlearning": "newton", "normalize": "relative"}, t.train, context,
                       queries=t.test_batch(digits_leakage.query_index), per_sample=True)
    assert leakage_detection(scores, digits_leakage.copy_index).top1 == 1.0


def test_params_validation() -> None:
    newton = ForwardInfParams.parse({"unlearning": "newton", "ihvp": "cg", "damping": 0.1, "lr": 0.5})
    assert newton.newton and newton.resolved() == newton
    assert ForwardInfParams.parse(newton.to_dict()) == newton
    assert not ForwardInfParams().newton
    for bad, field in (({"optimizer": "sgd"}, "optimizer"), ({"steps": 5}, "steps"), ({"auto": True}, "auto"),
                       ({"damping": 0.0}, "damping"), ({"ihvp": "magic"}, "ihvp"),
                       ({"arnoldi_rank": 10, "arnoldi_iterations": 5}, "arnoldi_iterations")):
        with pytest.raises(ParamsError, match=field):
            ForwardInfParams.parse({"unlearning": "newton", **bad})
    ForwardInfParams.parse({"unlearning": "newton", "steps": 1})
    for only_newton in ({"ihvp": "cg"}, {"damping": 0.1}, {"cg_max_iter": 5}, {"fit_rows": 10}):
        with pytest.raises(ParamsError, match="newton"):
            ForwardInfParams.parse(only_newton)
    with pytest.raises(ParamsError, match="unlearning"):
        ForwardInfParams.parse({"unlearning": "exact"})
