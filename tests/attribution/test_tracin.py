"""TracInCP against exact gradient dot products computed one row at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attribution.artifacts import InMemoryArtifacts
from attribution.data import TensorTrainingSet
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.gradient_features import last_layer_prefix
from attribution.methods.tracin import TracIn, TracInParams
from attribution.model import ModelAdapter
from attribution.projection import RandomProjector
from attribution.tasks import ClassificationTask
from tests.attribution.fixtures import Leakage, Trained


def exact_loss_grads(module: nn.Module, x: Tensor, y: Tensor, prefix: str | None = None) -> Tensor:
    """`[N, P]` cross-entropy gradients, one backward per row (independent of ModelAdapter)."""
    params = [p for n, p in module.named_parameters() if prefix is None or n.startswith(prefix + ".")]
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(module(x[i: i + 1]), y[i: i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def tracin(model: ModelAdapter, checkpoints: list[ModelAdapter] | None = None,
           lrs: list[float] | None = None, **params: object) -> TracIn:
    context = FitContext("test", InMemoryArtifacts(), checkpoints=checkpoints or [], checkpoint_lrs=lrs or [])
    return TracIn(model, TracInParams.parse(params), context)


def perturbed(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    """A different 'checkpoint' of the same architecture."""
    other = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


def test_one_checkpoint_equals_exact_gradient_dot_products(wine_mlp: Trained) -> None:
    queries = wine_mlp.test_batch(list(range(6)))
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)
    g_query = exact_loss_grads(wine_mlp.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    expected = g_query @ g_train.T
    final_only = tracin(wine_mlp.adapter, batch_size=32, last_layer=False)
    explicit = tracin(wine_mlp.adapter, [wine_mlp.adapter], [1.0], batch_size=32, last_layer=False)
    for method in (final_only, explicit):
        per_sample = method.score(queries, wine_mlp.train, per_sample=True)
        assert per_sample.shape == (6, len(wine_mlp.y_train))
        torch.testing.assert_close(per_sample, expected, rtol=1e-4, atol=1e-5)
        joint = method.score(queries, wine_mlp.train)
        assert joint.shape == (1, len(wine_mlp.y_train))
        torch.testing.assert_close(joint, g_query.mean(0, keepdim=True) @ g_train.T, rtol=1e-4, atol=1e-5)


def test_checkpoints_sum_with_learning_rate_weights(wine_mlp: Trained) -> None:
    first, second = perturbed(wine_mlp.module, 1), perturbed(wine_mlp.module, 2)
    queries = wine_mlp.test_batch([0, 5, 9])
    lrs = [0.5, 0.1]
    expected = torch.zeros(3, len(wine_mlp.y_train))
    for module, lr in zip((first, second), lrs, strict=True):
        g_query = exact_loss_grads(module, queries.inputs, queries.targets)  # type: ignore[arg-type]
        expected += lr * g_query @ exact_loss_grads(module, wine_mlp.x_train, wine_mlp.y_train).T
    adapters = [ModelAdapter(m, ClassificationTask()) for m in (first, second)]
    method = tracin(wine_mlp.adapter, adapters, lrs, last_layer=False)
    torch.testing.assert_close(method.score(queries, wine_mlp.train, per_sample=True), expected, rtol=1e-4, atol=1e-5)
    self_expected = torch.zeros(len(wine_mlp.y_train))
    for module, lr in zip((first, second), lrs, strict=True):
        self_expected += lr * exact_loss_grads(module, wine_mlp.x_train, wine_mlp.y_train).square().sum(1)
    torch.testing.assert_close(method.self_influence(wine_mlp.train), self_expected, rtol=1e-4, atol=1e-5)


def test_last_layer_uses_only_that_layers_gradients(wine_mlp: Trained) -> None:
    assert last_layer_prefix(wine_mlp.adapter) == "4"
    queries = wine_mlp.test_batch([1, 2])
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train, prefix="4")
    g_query = exact_loss_grads(wine_mlp.module, queries.inputs, queries.targets, prefix="4")  # type: ignore[arg-type]
    assert g_train.shape[1] == 16 * 3 + 3
    for params in ({"last_layer": True}, {"layers": ["4"]}):
        scores = tracin(wine_mlp.adapter, **params).score(queries, wine_mlp.train, per_sample=True)
        torch.testing.assert_close(scores, g_query @ g_train.T, rtol=1e-4, atol=1e-6)
    full = tracin(wine_mlp.adapter, last_layer=False).score(queries, wine_mlp.train, per_sample=True)
    assert not torch.allclose(full, g_query @ g_train.T, rtol=1e-2)
    # a classifier's default is the last layer (TracInParams.for_task)
    default = tracin(wine_mlp.adapter).score(queries, wine_mlp.train, per_sample=True)
    torch.testing.assert_close(default, g_query @ g_train.T, rtol=1e-4, atol=1e-6)


def test_last_layer_default_depends_on_the_task() -> None:
    """Unset `last_layer`: classifiers take the last layer, regression and causal LMs every
    layer; explicit values and explicit `layers` are kept."""
    unset = TracInParams()
    assert unset.last_layer is None
    assert unset.for_task("classification").last_layer is True
    assert unset.for_task("regression").last_layer is False
    assert unset.for_task("causal_lm").last_layer is False
    assert TracInParams(last_layer=False).for_task("classification").last_layer is False
    assert TracInParams(layers=("4",)).for_task("classification").last_layer is False


def test_bare_linear_model_last_layer_is_the_whole_model(digits_lr: Trained) -> None:
    assert last_layer_prefix(digits_lr.adapter) is None
    queries = digits_lr.test_batch([0])
    torch.testing.assert_close(
        tracin(digits_lr.adapter, last_layer=True).score(queries, digits_lr.train),
        tracin(digits_lr.adapter).score(queries, digits_lr.train),
    )


def test_self_influence_is_squared_gradient_norm(wine_mlp: Trained) -> None:
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)
    self_inf = tracin(wine_mlp.adapter, last_layer=False).self_influence(wine_mlp.train)
    assert self_inf.shape == (len(wine_mlp.y_train),)
    torch.testing.assert_close(self_inf, g_train.square().sum(1), rtol=1e-4, atol=1e-6)


def test_projection_is_the_seeded_jl_projection_of_the_gradients(wine_mlp: Trained) -> None:
    queries = wine_mlp.test_batch([3, 4, 7])
    g_train = exact_loss_grads(wine_mlp.module, wine_mlp.x_train, wine_mlp.y_train)
    g_query = exact_loss_grads(wine_mlp.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    matrix = RandomProjector(g_train.shape[1], 64, seed=4).matrix()
    scores = tracin(wine_mlp.adapter, projection_dim=64, seed=4, last_layer=False).score(
        queries, wine_mlp.train, per_sample=True)
    torch.testing.assert_close(scores, (g_query @ matrix) @ (g_train @ matrix).T, rtol=1e-4, atol=1e-5)
    again = tracin(wine_mlp.adapter, projection_dim=64, seed=4, last_layer=False).score(queries, wine_mlp.train, per_sample=True)
    assert torch.equal(scores, again)
    other_seed = tracin(wine_mlp.adapter, projection_dim=64, seed=5, last_layer=False).score(queries, wine_mlp.train, per_sample=True)
    assert not torch.allclose(scores, other_seed)


def test_torchscript_module_gives_the_eager_scores(wine_mlp: Trained) -> None:
    scripted = ModelAdapter(torch.jit.script(copy.deepcopy(wine_mlp.module)), ClassificationTask())
    queries = wine_mlp.test_batch([0, 1])
    torch.testing.assert_close(
        tracin(scripted, last_layer=True).score(queries, wine_mlp.train, per_sample=True),
        tracin(wine_mlp.adapter, last_layer=True).score(queries, wine_mlp.train, per_sample=True),
        rtol=1e-4, atol=1e-6,
    )


def test_progress_reaches_one_across_checkpoints(wine_mlp: Trained) -> None:
    seen: list[float] = []
    context = FitContext("test", progress=seen.append,
                         checkpoints=[wine_mlp.adapter, wine_mlp.adapter], checkpoint_lrs=[1.0, 1.0])
    TracIn(wine_mlp.adapter, TracInParams(batch_size=40), context).score(wine_mlp.test_batch([0]), wine_mlp.train)
    assert len(seen) == 8  # 4 batches of 130 rows per checkpoint
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and seen[3] == pytest.approx(0.5)


def test_planted_copy_scores_positive_and_raw_top1_is_recorded(digits_leakage: Leakage) -> None:
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    scores = tracin(trained.adapter).score(queries, trained.train, per_sample=True)
    copies = scores[torch.arange(len(queries)), digits_leakage.copy_index]
    assert (copies > 0).all()  # ∇L_q·∇L_q > 0 for the exact copy
    top1 = int((scores.argmax(dim=1) == digits_leakage.copy_index).sum())
    print(f"\nraw TracIn ranks the planted copy first for {top1}/{len(queries)} digits leakage queries")


def test_bad_params_and_checkpoint_lists_are_rejected(wine_mlp: Trained) -> None:
    with pytest.raises(ParamsError, match="layers"):
        TracInParams.parse({"layers": ["4"], "last_layer": True})
    with pytest.raises(ParamsError, match="projection_dim"):
        TracInParams.parse({"projection_dim": 0})
    with pytest.raises(ParamsError, match="projection_type"):
        TracInParams.parse({"projection_type": "sparse"})
    with pytest.raises(ParamsError, match="step"):
        TracInParams.parse({"step": 1})
    with pytest.raises(ValueError, match="learning rates"):
        tracin(wine_mlp.adapter, [wine_mlp.adapter], [0.1, 0.2]).score(wine_mlp.test_batch([0]), wine_mlp.train)
    with pytest.raises(ValueError, match="match no trainable"):
        tracin(wine_mlp.adapter, layers=["nope"]).score(wine_mlp.test_batch([0]), wine_mlp.train)
    empty = TensorTrainingSet(wine_mlp.x_test[:0], wine_mlp.y_test[:0])
    with pytest.raises(ValueError, match="empty"):
        tracin(wine_mlp.adapter).score(empty.all, wine_mlp.train)
