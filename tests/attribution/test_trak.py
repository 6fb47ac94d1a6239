"""TRAK against a dense hand computation on logistic regression, and artifact reuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.trak import Trak, TrakParams, correct_class_margin, margin_gradients
from attribution.model import ModelAdapter
from attribution.projection import RandomProjector
from attribution.tasks import ClassificationTask, RegressionTask
from tests.attribution.fixtures import Leakage, Trained


def linear_margin_grads(linear: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """By hand for ℓ = Wx + b: ∂f/∂ℓ = e_y − softmax over j≠y; ∂f/∂W = (∂f/∂ℓ) xᵀ, ∂f/∂b = ∂f/∂ℓ.

    Returns the `[N, P]` gradients (weight row-major, then bias) and `p_i` `[N]`.
    """
    with torch.no_grad():
        logits = linear(x).double()
        others = logits.scatter(1, y[:, None], float("-inf")).softmax(dim=1)
        d_logits = torch.nn.functional.one_hot(y, logits.shape[1]).double() - others
        grads = torch.cat([(d_logits[:, :, None] * x.double()[:, None, :]).reshape(len(y), -1), d_logits], dim=1)
        p = logits.softmax(dim=1).gather(1, y[:, None]).squeeze(1)
    return grads, p


def dense_trak(phi_query: Tensor, phi_train: Tensor, p_train: Tensor, damping: float) -> Tensor:
    """`φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i (1 − p_i)`, float64, dense."""
    gram = phi_train.T @ phi_train + damping * torch.eye(phi_train.shape[1], dtype=torch.float64)
    return (phi_query @ torch.linalg.solve(gram, phi_train.T)) * (1 - p_train)[None, :]


def trak(model: ModelAdapter, store: InMemoryArtifacts | None = None, fingerprint: str = "digits",
         checkpoints: list[ModelAdapter] | None = None, **params: object) -> Trak:
    context = FitContext(fingerprint, store if store is not None else InMemoryArtifacts(),
                         checkpoints=checkpoints or [])
    return Trak(model, TrakParams.parse(params), context)


def test_margin_is_log_odds_of_the_correct_class() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    p = logits.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(correct_class_margin(logits, targets), torch.log(p / (1 - p)))


def test_margin_gradients_match_hand_derivation_eager_and_torchscript(digits_lr: Trained) -> None:
    batch = Batch(digits_lr.x_train[:100], digits_lr.y_train[:100])
    expected, _ = linear_margin_grads(digits_lr.module, batch.inputs, batch.targets)  # type: ignore[arg-type]
    scripted = ModelAdapter(torch.jit.script(copy.deepcopy(digits_lr.module)), ClassificationTask())
    for model in (digits_lr.adapter, scripted):
        torch.testing.assert_close(margin_gradients(model, batch).double(), expected, rtol=1e-4, atol=1e-5)


def test_unprojected_scores_equal_dense_kernel_computation(digits_lr: Trained) -> None:
    damping = 1e-3
    queries = digits_lr.test_batch(list(range(8)))
    phi_train, p_train = linear_margin_grads(digits_lr.module, digits_lr.x_train, digits_lr.y_train)
    phi_query, _ = linear_margin_grads(digits_lr.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    expected = dense_trak(phi_query, phi_train, p_train, damping)
    # projection_dim 2048 ≥ P = 650: features are the raw margin gradients.
    method = trak(digits_lr.adapter, damping=damping)
    per_sample = method.score(queries, digits_lr.train, per_sample=True)
    assert per_sample.shape == (8, len(digits_lr.y_train))
    scale = expected.abs().max().item()
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-3, atol=1e-4 * scale)
    joint = method.score(queries, digits_lr.train)
    assert joint.shape == (1, len(digits_lr.y_train))
    torch.testing.assert_close(joint.double(), expected.mean(0, keepdim=True), rtol=1e-3, atol=1e-4 * scale)
    self_expected = torch.einsum("ij,ij->i", phi_train @ torch.linalg.inv(
        phi_train.T @ phi_train + damping * torch.eye(650, dtype=torch.float64)), phi_train) * (1 - p_train)
    torch.testing.assert_close(method.self_influence(digits_lr.train).double(), self_expected, rtol=1e-3, atol=1e-6)


def test_projected_scores_equal_dense_computation_with_the_same_matrix(digits_lr: Trained) -> None:
    queries = digits_lr.test_batch([0, 1, 2])
    matrix = RandomProjector(650, 128, seed=3, kind="gaussian").matrix().double()
    phi_train, p_train = linear_margin_grads(digits_lr.module, digits_lr.x_train, digits_lr.y_train)
    phi_query, _ = linear_margin_grads(digits_lr.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    expected = dense_trak(phi_query @ matrix, phi_train @ matrix, p_train, 0.01)
    method = trak(digits_lr.adapter, projection_dim=128, projection_type="gaussian", seed=3, damping=0.01)
    scores = method.score(queries, digits_lr.train, per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())
    again = trak(digits_lr.adapter, projection_dim=128, projection_type="gaussian", seed=3, damping=0.01)
    assert torch.equal(scores, again.score(queries, digits_lr.train, per_sample=True))


def test_loss_gradient_features_without_margin(digits_lr: Trained) -> None:
    # For cross-entropy ∇L = −(1 − p) ∇f: loss-gradient features carry Q themselves (Q = I).
    queries = digits_lr.test_batch([6, 7])
    phi_train, p_train = linear_margin_grads(digits_lr.module, digits_lr.x_train, digits_lr.y_train)
    phi_query, p_query = linear_margin_grads(digits_lr.module, queries.inputs, queries.targets)  # type: ignore[arg-type]
    g_train, g_query = -(1 - p_train)[:, None] * phi_train, -(1 - p_query)[:, None] * phi_query
    expected = dense_trak(g_query, g_train, torch.zeros_like(p_train), 1e-3)
    scores = trak(digits_lr.adapter, use_margin=False, damping=1e-3).score(queries, digits_lr.train, per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


def test_second_instance_on_the_same_store_reuses_the_fitted_artifacts(
    digits_lr: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    featurize = Trak._featurize

    def counting(self: Trak, *args: object) -> dict[str, Tensor]:
        calls.append(1)
        return featurize(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Trak, "_featurize", counting)
    store = InMemoryArtifacts()
    queries = digits_lr.test_batch([4, 5])
    first = trak(digits_lr.adapter, store, projection_dim=64).score(queries, digits_lr.train, per_sample=True)
    assert len(calls) == 1 and store.misses == 1 and len(store.data) == 1

    second = trak(digits_lr.adapter, store, projection_dim=64).score(queries, digits_lr.train, per_sample=True)
    assert len(calls) == 1 and store.hits == 1  # loaded, not recomputed
    torch.testing.assert_close(second, first)

    trak(digits_lr.adapter, store, projection_dim=64, damping=0.1).fit(digits_lr.train)
    trak(digits_lr.adapter, store, fingerprint="other", projection_dim=64).fit(digits_lr.train)
    assert len(calls) == 3 and len(store.data) == 3  # other params / other data: new artifacts


def test_checkpoint_ensemble_averages_per_model_scores(wine_mlp: Trained) -> None:
    other = copy.deepcopy(wine_mlp.module)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.7)
    models = [wine_mlp.adapter, ModelAdapter(other, ClassificationTask())]
    queries = wine_mlp.test_batch([0, 1, 2])
    store = InMemoryArtifacts()
    ensemble = trak(wine_mlp.adapter, store, checkpoints=models, projection_dim=100)
    scores = ensemble.score(queries, wine_mlp.train, per_sample=True)
    assert len(store.data) == 2  # one artifact per checkpoint
    singles = [trak(m, projection_dim=100).score(queries, wine_mlp.train, per_sample=True) for m in models]
    torch.testing.assert_close(scores, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-6)


def test_regression_uses_loss_gradients_without_weighting() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen) + 0.1 * torch.randn(60, 1, generator=gen)
    torch.manual_seed(0)
    linear = nn.Linear(5, 1)
    model = ModelAdapter(linear, RegressionTask())
    queries = Batch(x[:4], y[:4])
    with torch.no_grad():
        residual = 2 * (linear(x) - y).double()  # ∂(f − y)²/∂f
    grads = torch.cat([residual * x.double(), residual], dim=1)  # [60, 6]
    gram = grads.T @ grads + 1e-3 * torch.eye(6, dtype=torch.float64)
    expected = grads[:4] @ torch.linalg.solve(gram, grads.T)
    scores = trak(model, damping=1e-3).score(queries, TensorTrainingSet(x, y), per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_planted_copy_scores_positive_and_raw_top1_is_recorded(digits_leakage: Leakage) -> None:
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    scores = trak(trained.adapter).score(queries, trained.train, per_sample=True)
    copies = scores[torch.arange(len(queries)), digits_leakage.copy_index]
    assert (copies > 0).all()  # φ_qᵀKφ_q(1 − p) > 0 for the exact copy
    top1 = int((scores.argmax(dim=1) == digits_leakage.copy_index).sum())
    print(f"\nTRAK (defaults) ranks the planted copy first for {top1}/{len(queries)} digits leakage queries")


def test_bad_params_are_rejected() -> None:
    with pytest.raises(ParamsError, match="damping"):
        TrakParams.parse({"damping": 0.0})
    with pytest.raises(ParamsError, match="damping"):
        TrakParams.parse({"damping": -1})
    with pytest.raises(ParamsError, match="projection_dim"):
        TrakParams.parse({"projection_dim": 1 << 20})
    with pytest.raises(ParamsError, match="use_margin"):
        TrakParams.parse({"use_margin": "yes"})
    assert TrakParams.parse({"projection_dim": None}).projection_dim is None
    assert TrakParams().projection_dim == 2048
