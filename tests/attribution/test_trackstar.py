"""TrackStar against a direct computation (one-example-at-a-time gradients → second-moment
scaling → projection → unit norm → cosine), copies ranking first, and stored features reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.feature_files import FeatureFiles, read_arguments
from attribution.methods.base import FitContext, ParamsError
from attribution.methods.trackstar import (
    ADAM_EPS,
    ESTIMATE_EPS_FRACTION,
    FEATURES_KIND,
    TrackStar,
    TrackStarParams,
)
from attribution.model import ModelAdapter
from attribution.optimizer_state import OptimizerStateError, SecondMoment
from attribution.pipeline import attribute
from attribution.projection import RandomProjector
from attribution.tasks import CausalLMTask, RegressionTask
from tests.attribution.fixtures import Leakage, Trained


def loop_gradients(model: ModelAdapter, batch: Batch) -> Tensor:
    """`[B, P]` float64 loss gradients, one example at a time with plain autograd."""
    rows = []
    for b in range(len(batch)):
        model.module.zero_grad()
        model.loss(batch.slice(b, b + 1)).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.live_params()]).double())  # type: ignore[union-attr]
    model.module.zero_grad()
    return torch.stack(rows)


def direct_trackstar(query_grads: Tensor, train_grads: Tensor, denominator: Tensor, matrix: Tensor | None) -> Tensor:
    """`[Q, N]` cosine of `(g ⊘ denominator) R` between query and training rows, float64."""
    q, t = query_grads / denominator, train_grads / denominator
    if matrix is not None:
        q, t = q @ matrix, t @ matrix
    q, t = q / q.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return q @ t.T


def trackstar(model: ModelAdapter, files: FeatureFiles | None = None, second_moment: SecondMoment | None = None,
              **params: object) -> TrackStar:
    context = FitContext("digits", feature_files=files, second_moment=second_moment)
    return TrackStar(model, TrackStarParams.parse(params), context)


def test_projected_scores_equal_the_direct_computation_with_the_estimated_second_moment(digits_mlp: Trained) -> None:
    model, train = digits_mlp.adapter, digits_mlp.train
    queries = digits_mlp.test_batch([0, 1, 2])
    train_grads = loop_gradients(model, train.all)
    v = train_grads[:300].square().mean(dim=0)  # fit_rows=300: the first 300 rows
    denominator = v.sqrt() + ESTIMATE_EPS_FRACTION * v.sqrt().mean()
    matrix = RandomProjector(model.num_params, 128, seed=5).matrix().double()
    expected = direct_trackstar(loop_gradients(model, queries), train_grads, denominator, matrix)

    method = trackstar(model, projection_dim=128, seed=5, fit_rows=300, batch_size=200)
    per_sample = method.score(queries, train, per_sample=True)
    assert per_sample.shape == (3, len(train))
    torch.testing.assert_close(per_sample.double(), expected, rtol=1e-4, atol=1e-4)
    joint = method.score(queries, train)
    torch.testing.assert_close(joint.double(), expected.mean(dim=0, keepdim=True), rtol=1e-4, atol=1e-4)


def test_registered_optimizer_state_divides_by_its_square_root(digits_mlp: Trained, tmp_path: Path) -> None:
    model, train = digits_mlp.adapter, digits_mlp.train
    generator = torch.Generator().manual_seed(0)
    exp_avg_sq = {name: torch.rand(p.shape, generator=generator) * 1e-4 for name, p in model.params().items()}
    save_file(exp_avg_sq, str(tmp_path / "exp_avg_sq.safetensors"))
    moment = SecondMoment.from_safetensors(tmp_path / "exp_avg_sq.safetensors", digest="sha-a")
    queries = digits_mlp.test_batch([3, 4])
    v = torch.cat([exp_avg_sq[n].reshape(-1) for n in model.param_names]).double()
    expected = direct_trackstar(loop_gradients(model, queries), loop_gradients(model, train.all),
                                v.sqrt() + ADAM_EPS, None)
    scores = trackstar(model, second_moment=moment, projection_dim=None,
                       optimizer_state="file:///data/exp_avg_sq.safetensors").score(queries, train, per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


def test_optimizer_state_that_does_not_fit_the_model_is_refused(digits_mlp: Trained, tmp_path: Path) -> None:
    model = digits_mlp.adapter
    params = model.params()
    first = next(iter(params))
    save_file({first: torch.zeros(params[first].shape)}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(OptimizerStateError, match="no second moment for parameter"):
        SecondMoment.from_safetensors(tmp_path / "missing.safetensors", "d").flat(model)
    save_file({n: torch.zeros(3) for n in params}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(OptimizerStateError, match="has shape"):
        SecondMoment.from_safetensors(tmp_path / "shape.safetensors", "d").flat(model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OptimizerStateError, match="cannot read"):
        SecondMoment.from_safetensors(tmp_path / "junk.safetensors", "d")


@pytest.mark.parametrize("projection_dim", [None, 64])
def test_an_exact_duplicate_of_a_training_row_ranks_first(digits_leakage: Leakage, projection_dim: int | None) -> None:
    trained = digits_leakage.trained
    queries = trained.test_batch(digits_leakage.query_index)
    scores = trackstar(trained.adapter, projection_dim=projection_dim).score(queries, trained.train, per_sample=True)
    assert torch.equal(scores.argmax(dim=1), digits_leakage.copy_index)
    torch.testing.assert_close(scores.max(dim=1).values, torch.ones(len(queries)), rtol=0, atol=1e-5)


def test_features_are_built_once_and_reused_from_the_files(digits_mlp: Trained, tmp_path: Path) -> None:
    files = FeatureFiles(tmp_path / "features")
    queries = digits_mlp.test_batch([0, 5])
    first = trackstar(digits_mlp.adapter, files, projection_dim=64)
    scores = first.score(queries, digits_mlp.train, per_sample=True)
    assert files.built == {"trackstar_second_moment": 1, FEATURES_KIND: 1}
    assert first.context.extras["trackstar_features"] == "built"
    [entry] = list((tmp_path / "features" / FEATURES_KIND).iterdir())
    stored = np.load(entry / "features.npy")
    assert stored.shape == (len(digits_mlp.train), 64)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)
    assert read_arguments(entry)["dim"] == 64 and read_arguments(entry)["num_rows"] == len(digits_mlp.train)
    modified = (entry / "features.npy").stat().st_mtime_ns

    second = trackstar(digits_mlp.adapter, files, projection_dim=64)  # a new instance: a second query
    again = second.score(queries, digits_mlp.train, per_sample=True)
    assert torch.equal(scores, again)
    assert files.built == {"trackstar_second_moment": 1, FEATURES_KIND: 1}
    assert files.reused == {"trackstar_second_moment": 1, FEATURES_KIND: 1}
    assert second.context.extras["trackstar_features"] == "reused"
    assert (entry / "features.npy").stat().st_mtime_ns == modified

    trackstar(digits_mlp.adapter, files, projection_dim=32).fit(digits_mlp.train)  # other fit arguments
    assert len(list((tmp_path / "features" / FEATURES_KIND).iterdir())) == 2


def test_regression_scores_equal_the_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=generator)
    y = x @ torch.randn(5, 1, generator=generator) + 0.1 * torch.randn(60, 1, generator=generator)
    torch.manual_seed(0)
    model = ModelAdapter(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)), RegressionTask())
    train = TensorTrainingSet(x[:50], y[:50])
    queries = Batch(x[50:], y[50:])
    train_grads = loop_gradients(model, train.all)
    v = train_grads.square().mean(dim=0)
    expected = direct_trackstar(loop_gradients(model, queries), train_grads,
                                v.sqrt() + ESTIMATE_EPS_FRACTION * v.sqrt().mean(), None)
    scores = attribute(model, "trackstar", {}, train, FitContext("reg"), queries=queries, per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


def test_causal_lm_scores_equal_the_direct_computation_and_find_a_copied_sentence() -> None:
    from benchmarks.lm_facts import tiny_gpt2

    torch.manual_seed(0)
    model = ModelAdapter(tiny_gpt2(20, 8, width=16, layers=1, heads=2), CausalLMTask())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 20, (12, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0  # some padded rows
    ids[::3, 5:] = 0
    targets = ids.masked_fill(mask == 0, -100)
    train = TensorTrainingSet({"input_ids": ids, "attention_mask": mask}, targets)
    queries = train.rows(torch.tensor([4, 9]))
    train_grads = loop_gradients(model, train.all)
    v = train_grads[:6].square().mean(dim=0)
    matrix = RandomProjector(model.num_params, 256, seed=0).matrix().double()
    expected = direct_trackstar(loop_gradients(model, queries), train_grads,
                                v.sqrt() + ESTIMATE_EPS_FRACTION * v.sqrt().mean(), matrix)
    scores = attribute(model, "trackstar", {"projection_dim": 256, "fit_rows": 6}, train, FitContext("lm"),
                       queries=queries, per_sample=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)
    assert scores.argmax(dim=1).tolist() == [4, 9]


def test_bad_params_and_self_influence_are_refused(digits_mlp: Trained) -> None:
    for raw, field in [({"normalize": "relative"}, "normalize"), ({"fit_rows": 0}, "fit_rows"),
                       ({"eps": -1.0}, "eps"), ({"optimizer_state": "/etc/passwd"}, "optimizer_state"),
                       ({"projection_dim": 0}, "projection_dim")]:
        with pytest.raises(ParamsError) as caught:
            TrackStarParams.parse(raw)
        assert caught.value.field == field
    with pytest.raises(ValueError, match="does not define self-influence"):
        attribute(digits_mlp.adapter, "trackstar", {}, digits_mlp.train, FitContext("x"), queries=None,
                  self_influence=True)
    with pytest.raises(ValueError, match="second_moment is empty"):
        trackstar(digits_mlp.adapter, optimizer_state="file:///data/v.safetensors")
