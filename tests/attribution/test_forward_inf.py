"""Forward-INF against an independent Algorithm 1 (and its normalised-step variant), its
mirrored-influence target, the RelatIF denominators, caching, auto, and leakage detection on
a logistic regression, a tanh MLP and a ReLU MLP that has memorised its training rows."""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.evaluation import leakage_detection, pearson
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.forward_inf import ForwardInf, ForwardInfParams
from attribution.methods.forward_inf_unlearning import StackedModel
from attribution.model import ModelAdapter
from attribution.pipeline import attribute, relative_scores
from attribution.tasks import ClassificationTask
from tests.attribution import fixtures


def algorithm1(module: nn.Module, queries: Batch, x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """Reference: deepcopy θ̂, K plain SGD ascent steps on the mean query loss, loss difference."""
    theta = copy.deepcopy(module)
    opt = torch.optim.SGD(theta.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-F.cross_entropy(theta(queries.inputs), queries.targets)).backward()
        opt.step()
    with torch.no_grad():
        before = F.cross_entropy(module(x), y, reduction="none")
        after = F.cross_entropy(theta(x), y, reduction="none")
    return after - before


def normalized_ascent(module: nn.Module, queries: Batch, x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """Reference: deepcopy θ̂, K steps θ ← θ + α g/‖g‖₂ (g = ∇ mean query loss over all
    parameters, its norm recomputed every step), loss difference."""
    theta = copy.deepcopy(module)
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(theta(queries.inputs), queries.targets), list(theta.parameters()))
        norm = torch.stack([(g**2).sum() for g in grads]).sum().sqrt()
        with torch.no_grad():
            for param, g in zip(theta.parameters(), grads, strict=True):
                param.add_(lr * g / norm)
    with torch.no_grad():
        return F.cross_entropy(theta(x), y, reduction="none") - F.cross_entropy(module(x), y, reduction="none")


def run(module: nn.Module, trained: fixtures.Trained, queries: Batch, per_sample: bool = False,
        store: InMemoryArtifacts | None = None, **params: Any) -> Tensor:
    # raw scores (normalize "none": unset, the optimizer would default to normalized_sgd, not Algorithm 1)
    method = ForwardInf(ModelAdapter(module, ClassificationTask()), ForwardInfParams.parse({"normalize": "none",
                                                                                                **params}),
                        FitContext("fp", store=store))
    return method.score(queries, trained.train, per_sample=per_sample)


@pytest.mark.parametrize("scripted", [False, True])
def test_matches_algorithm1_joint_and_per_sample(wine_mlp: fixtures.Trained, scripted: bool) -> None:
    module = torch.jit.script(copy.deepcopy(wine_mlp.module)) if scripted else wine_mlp.module
    queries = wine_mlp.test_batch([0, 3, 7])
    joint = run(module, wine_mlp, queries, steps=5, lr=0.01)
    expected = algorithm1(wine_mlp.module, queries, wine_mlp.x_train, wine_mlp.y_train, 5, 0.01)
    assert joint.shape == (1, len(wine_mlp.y_train))
    torch.testing.assert_close(joint[0], expected, atol=1e-5, rtol=1e-4)
    per_sample = run(module, wine_mlp, queries, per_sample=True, steps=5, lr=0.01)
    assert per_sample.shape == (3, len(wine_mlp.y_train))
    for q in range(3):
        one = algorithm1(wine_mlp.module, queries.slice(q, q + 1), wine_mlp.x_train, wine_mlp.y_train, 5, 0.01)
        torch.testing.assert_close(per_sample[q], one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scripted", [False, True])
def test_normalized_sgd_matches_the_reference(wine_mlp: fixtures.Trained, scripted: bool) -> None:
    module = torch.jit.script(copy.deepcopy(wine_mlp.module)) if scripted else wine_mlp.module
    queries = wine_mlp.test_batch([0, 3, 7])
    params: dict[str, Any] = {"steps": 3, "lr": 0.05, "optimizer": "normalized_sgd"}
    joint = run(module, wine_mlp, queries, **params)
    expected = normalized_ascent(wine_mlp.module, queries, wine_mlp.x_train, wine_mlp.y_train, 3, 0.05)
    torch.testing.assert_close(joint[0], expected, atol=1e-5, rtol=1e-4)
    per_sample = run(module, wine_mlp, queries, per_sample=True, **params)
    for q in range(3):
        one = normalized_ascent(wine_mlp.module, queries.slice(q, q + 1), wine_mlp.x_train, wine_mlp.y_train, 3, 0.05)
        torch.testing.assert_close(per_sample[q], one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scripted", [False, True])
def test_normalized_sgd_skips_and_reports_a_zero_gradient(scripted: bool) -> None:
    module = nn.Linear(2, 3)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        module.bias.zero_()
    # query 0 has margin 200: its loss e^-200 and gradient underflow to exactly 0 in fp32
    queries = Batch(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    with torch.no_grad():
        assert float(ClassificationTask().loss(module, queries.inputs, queries.targets)[0]) == 0.0
    x, y = torch.randn(30, 2, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    target = torch.jit.script(copy.deepcopy(module)) if scripted else module
    context = FitContext("zero-gradient")
    method = ForwardInf(ModelAdapter(target, ClassificationTask()),
                        ForwardInfParams.parse({"steps": 2, "lr": 0.1, "optimizer": "normalized_sgd",
                                                                 "normalize": "none"}), context)
    scores = method.score(queries, TensorTrainingSet(x, y), per_sample=True)
    torch.testing.assert_close(scores[0], torch.zeros(30), atol=1e-6, rtol=0)  # θ unmoved (kernel rounding only)
    assert context.extras["zero_gradient_steps"] == 2
    expected = normalized_ascent(module, queries.slice(1, 2), x, y, 2, 0.1)
    torch.testing.assert_close(scores[1], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "normalized_sgd", "adam"])
def test_per_sample_equals_separate_joint_runs(wine_mlp: fixtures.Trained, optimizer: str) -> None:
    queries = wine_mlp.test_batch([1, 2, 5, 11])
    params: dict[str, Any] = {"steps": 3, "lr": 0.05, "optimizer": optimizer, "layers": ["4"]}
    batched = run(wine_mlp.module, wine_mlp, queries, per_sample=True, **params)
    scripted = run(torch.jit.script(copy.deepcopy(wine_mlp.module)), wine_mlp, queries, per_sample=True, **params)
    for q in range(len(queries)):
        single = run(wine_mlp.module, wine_mlp, queries.slice(q, q + 1), **params)[0]
        torch.testing.assert_close(batched[q], single, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scripted[q], single, atol=1e-5, rtol=1e-4)


def test_one_stacked_set_sweeps_like_the_vmapped_sets(wine_mlp: fixtures.Trained) -> None:
    """One parameter set is evaluated without `vmap`: bitwise the losses of the vmapped path."""
    stacked = StackedModel(wine_mlp.adapter)
    moved = stacked.unlearn(wine_mlp.test_batch([0]), ForwardInfParams(steps=2, lr=0.1).resolved().gradient_unlearning)
    rows = wine_mlp.train.all
    one = stacked.batch_losses(moved)(rows)  # [1, N]
    vmapped = vmap(lambda params: stacked.losses(params, rows.inputs, rows.targets))(moved)
    assert one.shape == (1, len(wine_mlp.y_train))
    torch.testing.assert_close(one, vmapped, rtol=0, atol=0)


def test_layers_restrict_the_update_and_descent_flips_the_sign(wine_mlp: fixtures.Trained) -> None:
    queries = wine_mlp.test_batch([4])
    last_only = run(wine_mlp.module, wine_mlp, queries, steps=1, lr=1e-3, layers=["4"], precision="fp64")
    full = run(wine_mlp.module, wine_mlp, queries, steps=1, lr=1e-3, precision="fp64")
    assert last_only.abs().max() > 0
    assert not torch.allclose(last_only, full)
    ascent = run(wine_mlp.module, wine_mlp, queries, steps=1, lr=1e-4, precision="fp64")
    descent = run(wine_mlp.module, wine_mlp, queries, steps=1, lr=1e-4, direction="descent", precision="fp64")
    # One tiny step either way changes each loss by ±α∇L_iᵀ∇L_q to first order; both signs
    # are flipped to "higher = supports the query", so the two score vectors nearly agree.
    assert pearson(ascent[0], descent[0]) > 0.999


@pytest.mark.slow
def test_correlates_with_exact_test_to_train_influence(digits_lr: fixtures.Trained) -> None:
    """Test→train influence of query q on row i, two exact definitions:
    - first order (asserted, Pearson ≥ 0.95): the change of L(θ, z_i) under one infinitesimal
      ascent step of size α on L_q, i.e. α∇L_iᵀ∇L_q, from exact per-sample gradients — the
      quantity Forward-INF measures in the small-step regime (K=5, α=0.01, Algorithm 1);
    - Hessian-aware (printed, only weakly asserted): the change of L(θ, z_i) when the model
      is refitted to convergence (fp64 L-BFGS) with ε·L_q, ε = 1e-3, SUBTRACTED from the
      objective, ≈ ε∇L_iᵀH⁻¹∇L_q. With l2 = 1e-3 the Hessian is ill-conditioned and the
      curvature-free Forward-INF only partly agrees with it (Pearson ≈ 0.42 measured)."""
    t = digits_lr
    scores_by_query = []
    base: Tensor | None = None
    for q in range(2):
        query = t.test_batch([q])
        scores = run(t.module, t, query, steps=5, lr=0.01)[0]
        x64, q64 = t.x_train.double(), t.x_test[q: q + 1].double()

        def refit(eps: float, x64: Tensor = x64, q64: Tensor = q64, query: Batch = query) -> Tensor:
            model = copy.deepcopy(t.module).double()
            opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=300, tolerance_grad=1e-12,
                                    tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = (F.cross_entropy(model(x64), t.y_train) - eps * F.cross_entropy(model(q64), query.targets)
                        + 0.5 * t.l2 * sum((p**2).sum() for p in model.parameters()))
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                return F.cross_entropy(model(x64), t.y_train, reduction="none")

        base = refit(0.0) if base is None else base
        exact = refit(1e-3) - base
        adapter = t.adapter
        first_order = 0.01 * adapter.per_sample_grads(t.train.all) @ adapter.grad(query)
        hessian_aware = pearson(scores, exact)
        print(f"\nquery {q}: Pearson vs first-order {pearson(scores, first_order):.4f}, vs refit {hessian_aware:.3f}")
        assert pearson(scores, first_order) >= 0.95
        assert hessian_aware >= 0.3
        scores_by_query.append(scores)
    assert not torch.allclose(scores_by_query[0], scores_by_query[1])


def test_second_query_reuses_cached_base_losses(wine_mlp: fixtures.Trained) -> None:
    module = copy.deepcopy(wine_mlp.module)
    full_sweeps = []
    n = len(wine_mlp.y_train)
    module.register_forward_hook(lambda _m, args, _out: full_sweeps.append(1) if len(args[0]) == n else None)
    store = InMemoryArtifacts()
    adapter = ModelAdapter(module, ClassificationTask())
    for expected_sweeps, query in ((2, [0]), (1, [1])):  # first: base + sweep; then: sweep only
        full_sweeps.clear()
        context = FitContext("wine-fingerprint", store=store)
        attribute(adapter, ForwardInf, {"steps": 2, "lr": 0.1, "normalize": "none"}, wine_mlp.train, context,
                  queries=wine_mlp.test_batch(query))
        assert len(full_sweeps) == expected_sweeps
        assert {"unlearn_s", "sweep_s", "base_losses_s"} <= set(context.timings)
    assert store.hits == 1


def test_self_influence_modes(wine_mlp: fixtures.Trained) -> None:
    adapter = ModelAdapter(wine_mlp.module, ClassificationTask())
    train = TensorTrainingSet(wine_mlp.x_train[:40], wine_mlp.y_train[:40])
    params = ForwardInfParams.parse({"steps": 3, "lr": 0.05, "chunk_size": 16, "normalize": "none"})
    unlearn = ForwardInf(adapter, params, FitContext("si")).self_influence(train)
    for i in (0, 17, 39):
        x, y = wine_mlp.x_train[i: i + 1], wine_mlp.y_train[i: i + 1]
        expected = algorithm1(wine_mlp.module, Batch(x, y), x, y, 3, 0.05)[0]
        assert float(unlearn[i]) == pytest.approx(float(expected), abs=1e-5, rel=1e-4)
    scripted = ModelAdapter(torch.jit.script(copy.deepcopy(wine_mlp.module)), ClassificationTask())
    torch.testing.assert_close(ForwardInf(scripted, params, FitContext("si")).self_influence(train), unlearn,
                               atol=1e-5, rtol=1e-4)
    grads = adapter.per_sample_grads(train.all).double()
    first_order = {"sgd": (grads**2).sum(1), "normalized_sgd": grads.norm(dim=1), "adam": grads.abs().sum(1)}
    for optimizer, norms in first_order.items():
        params = ForwardInfParams.parse({"lr": 0.05, "optimizer": optimizer, "self_influence_mode": "gradient_norm"})
        norm = ForwardInf(adapter, params, FitContext("si")).self_influence(train)
        torch.testing.assert_close(norm, (0.05 * norms).float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "normalized_sgd", "adam"])
def test_relative_scores_divide_by_the_gradient_norm_of_the_step(wine_mlp: fixtures.Trained, optimizer: str) -> None:
    """RelatIF denominator D_i per optimizer: score ≈ ⟨g_i, s(g_q)⟩ with the step map s, so
    D_i = sqrt(α)‖g_i‖₂ (sgd), α‖g_i‖₂ (normalized_sgd), α‖g_i‖₁ (adam)."""
    grads = wine_mlp.adapter.per_sample_grads(wine_mlp.train.all).double()
    expected_d = {"sgd": 0.05**0.5 * grads.norm(dim=1), "normalized_sgd": 0.05 * grads.norm(dim=1),
                  "adam": 0.05 * grads.abs().sum(1)}[optimizer]
    store = InMemoryArtifacts()
    params = {"steps": 1, "lr": 0.05, "optimizer": optimizer}
    queries = wine_mlp.test_batch([2, 9])
    raw = attribute(wine_mlp.adapter, ForwardInf, {**params, "normalize": "none"}, wine_mlp.train, FitContext("w", store=store),
                    queries=queries, per_sample=True)
    relative = attribute(wine_mlp.adapter, ForwardInf, {**params, "normalize": "relative"}, wine_mlp.train,
                         FitContext("w", store=store), queries=queries, per_sample=True)
    # normalized_sgd's relative scores take loss changes in log space (float64); the raw reference is a
    # float32 difference of losses, whose rounding (~6e-8·L_i) over D_i = α‖g_i‖ reaches a few 1e-6
    atol = 1e-5 if optimizer == "normalized_sgd" else 1e-6
    torch.testing.assert_close(relative, (raw.double() / expected_d).float(), atol=atol, rtol=1e-4)
    # a row's squared norm far below float32's range keeps its exact value (float64 division)
    tiny = relative_scores(torch.tensor([[3e-30, 1.0]]), torch.tensor([1e-60, 4.0], dtype=torch.float64), floor=1e-76)
    torch.testing.assert_close(tiny, torch.tensor([[3.0, 0.5]]))


def test_params_validation() -> None:
    with pytest.raises(ParamsError, match="steps"):
        ForwardInfParams.parse({"steps": 0})
    with pytest.raises(ParamsError, match="optimizer"):
        ForwardInfParams.parse({"optimizer": "rmsprop"})
    with pytest.raises(ParamsError, match="unknown"):
        ForwardInfParams.parse({"alpha": 1.0})
    defaults = ForwardInfParams().for_task("classification")  # relative (benchmarks/results/q3_leakage.md)
    assert (defaults.k, defaults.alpha, defaults.chosen_optimizer, defaults.normalize) == (
        1, 0.001, "normalized_sgd", "relative")
    raw = ForwardInfParams.parse({"normalize": "none"})
    assert (raw.k, raw.alpha, raw.chosen_optimizer) == (1, 0.01, "sgd")
    relative = ForwardInfParams.parse({"normalize": "relative"})
    assert (relative.k, relative.alpha, relative.chosen_optimizer) == (1, 0.001, "normalized_sgd")
    relative_sgd = ForwardInfParams.parse({"normalize": "relative", "optimizer": "sgd"}).resolved()
    assert (relative_sgd.steps, relative_sgd.lr, relative_sgd.optimizer) == (1, 0.01, "sgd")
    algorithm1 = ForwardInfParams.parse({"steps": 5, "lr": 0.01, "normalize": "none"}).gradient_unlearning
    assert (algorithm1.optimizer, algorithm1.steps, algorithm1.lr, algorithm1.ascent) == ("sgd", 5, 0.01, True)


def _top1(trained: fixtures.Trained, leak: fixtures.Leakage, params: Mapping[str, Any]) -> tuple[int, FitContext]:
    context = FitContext("leak-" + str(id(trained.module)), store=InMemoryArtifacts())
    scores = attribute(ModelAdapter(trained.module, ClassificationTask()), ForwardInf, params, trained.train,
                       context, queries=trained.test_batch(leak.query_index), per_sample=True)
    rate = leakage_detection(scores, leak.copy_index).top1
    return round(rate * len(leak.copy_index)), context


def test_relative_and_auto_rank_every_copy_first_on_lr(digits_leakage: fixtures.Leakage) -> None:
    t = digits_leakage.trained
    defaults, _ = _top1(t, digits_leakage, {})
    relative, _ = _top1(t, digits_leakage, {"normalize": "relative"})
    auto, context = _top1(t, digits_leakage, {"auto": True})
    print(f"\nLR leakage top-1 of 20: defaults {defaults}, relative {relative}, auto {auto} "
          f"({context.extras['auto']})")
    assert relative == auto == 20
    choice = context.extras["auto"]
    assert set(choice) == {"optimizer", "steps", "lr", "normalize", "self_retrieval"}
    assert choice["self_retrieval"] == 1.0


def test_auto_choice_is_cached_per_fingerprint(wine_mlp: fixtures.Trained) -> None:
    store = InMemoryArtifacts()
    adapter = ModelAdapter(wine_mlp.module, ClassificationTask())
    first = FitContext("wine-auto", store=store)
    ForwardInf(adapter, ForwardInfParams(auto=True), first).fit(wine_mlp.train)
    second = FitContext("wine-auto", store=store)
    method = ForwardInf(adapter, ForwardInfParams(auto=True), second)
    method.fit(wine_mlp.train)
    assert second.extras["auto"] == first.extras["auto"]
    assert second.timings["auto_s"] < first.timings["auto_s"] / 5
    assert method.settings.steps == first.extras["auto"]["steps"]


@pytest.fixture(scope="module")
def memorised_relu() -> fixtures.Leakage:
    """A 64-64-10 ReLU MLP that memorises 200 digits rows and 10 planted test copies (Adam,
    lr 0.03, 300 full-batch epochs): a quarter of its rows, copies included, have margins
    above 17, where `F.cross_entropy` returns exactly 0 loss and gradient."""
    x_train, y_train, x_test, y_test = fixtures.split_digits(0)
    generator = torch.Generator().manual_seed(1)
    query_index = torch.randperm(len(y_test), generator=generator)[:10]
    x = torch.cat([x_train[:200], x_test[query_index]])
    y = torch.cat([y_train[:200], y_test[query_index]])
    order = torch.randperm(len(y), generator=generator)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    # one thread: 300 tiny full-batch steps are overhead-bound (and the weights reproducible)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        module = fixtures.fit_adam(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x[order],
                                   y[order], epochs=300, lr=0.03, weight_decay=0.0)
    finally:
        torch.set_num_threads(threads)
    trained = fixtures.Trained(module, x[order], y[order], x_test, y_test, 0.0)
    return fixtures.Leakage(trained, query_index, position[200:])


def test_relative_normalized_sgd_finds_copies_a_model_has_memorised(memorised_relu: fixtures.Leakage) -> None:
    t = memorised_relu.trained
    with torch.no_grad():
        copy_losses = F.cross_entropy(t.module(t.x_train[memorised_relu.copy_index]),
                                      t.y_train[memorised_relu.copy_index], reduction="none")
    assert int((copy_losses == 0).sum()) >= 2  # the regime under test: memorised beyond float32 CE
    settings: dict[str, dict[str, Any]] = {
        "raw default": {}, "relative sgd": {"normalize": "relative", "optimizer": "sgd"},
        "relative (normalized_sgd)": {"normalize": "relative"},
    }
    rates = {name: _top1(t, memorised_relu, params)[0] for name, params in settings.items()}
    print(f"\nmemorised ReLU MLP leakage top-1 of 10: {rates}")
    assert rates["relative (normalized_sgd)"] == 10


def test_auto_finds_copies_a_model_has_memorised(memorised_relu: fixtures.Leakage) -> None:
    auto, context = _top1(memorised_relu.trained, memorised_relu, {"auto": True})
    print(f"\nmemorised ReLU MLP auto top-1 of 10: {auto} ({context.extras['auto']})")
    assert auto == 10


@pytest.mark.slow
def test_leakage_rates_mlp(digits_leakage: fixtures.Leakage) -> None:
    """The tanh-MLP column of the module docstring: 64-32-10 tanh MLP trained on the leaked set."""
    t = digits_leakage.trained
    torch.manual_seed(0)
    module = fixtures.fit_adam(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
                               t.x_train, t.y_train, seed=0)
    mlp = fixtures.Trained(module, t.x_train, t.y_train, t.x_test, t.y_test, 1e-4)
    settings: dict[str, dict[str, Any]] = {
        "defaults": {}, "raw": {"normalize": "none"}, "relative sgd": {"normalize": "relative", "optimizer": "sgd"},
        "relative (normalized_sgd)": {"normalize": "relative"},
        "relative adam": {"normalize": "relative", "optimizer": "adam"}, "auto": {"auto": True},
    }
    rates = {name: _top1(mlp, digits_leakage, params)[0] for name, params in settings.items()}
    print(f"\ntanh MLP leakage top-1 of 20: {rates}")
    assert rates["relative (normalized_sgd)"] == rates["auto"] == 20


def test_torchscript_query_with_cached_base_losses_in_a_fresh_process() -> None:
    """A second worker process gets L(θ̂, ·) from the store, so its first inference-mode call
    is the sweep of the unlearned TorchScript copy; that must not trip autograd."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))), buffer)

    def fresh_model() -> ModelAdapter:  # what a new process loads from the registered file
        buffer.seek(0)
        return ModelAdapter(torch.jit.load(buffer), ClassificationTask())

    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    train, queries, store = TensorTrainingSet(x, y), Batch(x[:1], y[:1]), InMemoryArtifacts()
    first = attribute(fresh_model(), "forward_inf", {}, train, FitContext("f", store), queries=queries)
    second = attribute(fresh_model(), "forward_inf", {}, train, FitContext("f", store), queries=queries)
    torch.testing.assert_close(first, second)
