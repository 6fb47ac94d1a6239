"""Rank stability (`attribution.stability`): definitions checked on hand-made score vectors,
then each resampling on tiny trained models: an exact copy of the query stays first in every
resample, a row at the top-k boundary does not, and the figures are a function of the seeds."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attribution.artifacts import InMemoryArtifacts
from attribution.data import Batch, TensorTrainingSet
from attribution.methods.base import AttributionMethod, FitContext, MethodParams, no_progress
from attribution.methods.forward_inf_params import ForwardInfParams
from attribution.methods.limits import MAXIMUMS
from attribution.methods.registry import parse_params
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from attribution.stability import (
    Resampling,
    StabilityError,
    StabilityParams,
    StabilityReport,
    _bootstrap,
    rank_stability,
    ranks_of,
    resampling_for,
    spread,
    stability_from_scores,
    summarize,
)
from tests.attribution.fixtures import Trained
from tests.attribution.test_tracin import perturbed


# ----------------------------------------------------------------------------- definitions
def test_ranks_follow_topk_order_with_ties_to_the_lower_index_and_nan_last() -> None:
    scores = torch.tensor([0.5, 0.9, 0.5, float("nan"), 0.1])
    rows = torch.tensor([0, 1, 2, 3, 4])
    assert ranks_of(scores, rows, largest=True).tolist() == [2, 1, 3, 5, 4]
    assert ranks_of(scores, rows, largest=False).tolist() == [2, 4, 3, 5, 1]


def test_share_and_nearest_rank_interval() -> None:
    ranks = torch.tensor([[1, 3], [1, 4], [1, 2], [1, 7]] * 5)  # R = 20 resamples of two rows
    first, second = summarize(ranks, k=3)
    assert (first.stability, first.rank_low, first.rank_high) == (1.0, 1, 1)
    assert second.stability == pytest.approx(0.5)
    assert (second.rank_low, second.rank_high) == (2, 7)  # ⌈0.05·20⌉ = 1st and ⌈0.95·20⌉ = 19th smallest


def test_report_of_hand_made_resamples() -> None:
    reported = torch.tensor([[4.0, 3.0, 2.9, 0.0, -1.0]])
    resampled = [torch.tensor([[4.0, 3.0, 2.9, 0.0, -1.0]]), torch.tensor([[4.0, 2.8, 2.9, 0.0, -1.0]])]
    report = stability_from_scores(reported, iter(resampled), 2, resampling=Resampling.PROJECTION_SEED,
                                   values=[1.0, 2.0], offset=100)
    first = report.get("top", 0, 100)
    assert first is not None and first.stability == 1.0
    boundary = report.get("top", 0, 101)
    assert boundary is not None and boundary.stability == 0.5 and (boundary.rank_low, boundary.rank_high) == (2, 3)
    lowest = report.get("bottom", 0, 104)
    assert lowest is not None and lowest.stability == 1.0
    assert report.summary()["resamples"] == 2


def test_spread_is_log_even_around_the_center() -> None:
    values = spread(0.01, 2.0, 4)
    assert values[0] == pytest.approx(0.01 * 2 ** -0.375) and values[-1] == pytest.approx(0.01 * 2 ** 0.375)
    assert torch.tensor(values, dtype=torch.float64).log().diff().std() < 1e-12


def test_resamples_are_bounded_by_the_limits() -> None:
    assert StabilityParams.parse({"resamples": MAXIMUMS["resamples"]}).resamples == MAXIMUMS["resamples"]
    with pytest.raises(StabilityError, match=r"stability.resamples: must be at most 32"):
        StabilityParams.parse({"resamples": MAXIMUMS["resamples"] + 1})
    for bad in ({"resamples": 1}, {"resamples": 2.5}, {"seeds": 3}, [3]):
        with pytest.raises(StabilityError):
            StabilityParams.parse(bad)


def test_resampling_by_method_and_params() -> None:
    def plan(method: str, **params: object) -> Resampling:
        return resampling_for(method, parse_params(method, params))

    assert plan("trak") == Resampling.PROJECTION_SEED
    assert plan("trackstar") == Resampling.PROJECTION_SEED
    assert plan("tracin", projection_dim=16) == Resampling.PROJECTION_SEED
    assert plan("tracin", checkpoint_model_ids=["a", "b"]) == Resampling.CHECKPOINT_BOOTSTRAP
    assert plan("forward_inf") == Resampling.STEP_SIZE
    assert plan("forward_inf", unlearning="newton") == Resampling.DAMPING
    assert plan("influence", ihvp="lissa") == Resampling.LISSA_SEED
    assert plan("influence", ihvp="cg") == Resampling.DAMPING
    assert plan("integrated_influence") == Resampling.DAMPING
    for method, params in (("tracin", {}), ("gradient_similarity", {}), ("tracin", {"checkpoint_model_ids": ["a"]})):
        with pytest.raises(StabilityError, match="deterministic: nothing to resample"):
            plan(method, **params)


# ----------------------------------------------------------------------------- on trained models
def _leaked(trained: Trained, copy_of: int = 0) -> tuple[TensorTrainingSet, Batch, int]:
    """The training set with test row `copy_of` appended (its exact copy is the last row)."""
    x = torch.cat([trained.x_train, trained.x_test[copy_of: copy_of + 1]])
    y = torch.cat([trained.y_train, trained.y_test[copy_of: copy_of + 1]])
    return TensorTrainingSet(x, y), trained.test_batch([copy_of]), len(y) - 1


def _run(model: ModelAdapter, method: str, params: dict[str, object], train: TensorTrainingSet, queries: Batch | None,
         context: FitContext, resamples: int, k: int, *, self_influence: bool = False) -> tuple[Tensor, StabilityReport]:
    fitted: list[AttributionMethod] = []
    scores = attribute(model, method, params, train, context, queries=queries, on_fitted=fitted.append,
                       self_influence=self_influence)
    report = rank_stability(fitted[0], scores, train, StabilityParams(resamples), queries=queries, k=k,
                            self_influence=self_influence)
    return scores, report


@pytest.mark.parametrize(("method", "params"), [
    ("tracin", {"projection_dim": 8, "normalize": "relative"}),
    ("trak", {"projection_dim": 16}),
])
def test_exact_copy_is_stable_and_a_boundary_row_is_not_across_projection_seeds(
    wine_mlp: Trained, method: str, params: dict[str, object]
) -> None:
    train, query, copy_index = _leaked(wine_mlp)
    context = FitContext("stability-test", InMemoryArtifacts())
    k = 5
    scores, report = _run(wine_mlp.adapter, method, params, train, query, context, resamples=12, k=k)
    top = torch.argsort(scores[0], descending=True)
    assert int(top[0]) == copy_index
    copy = report.get("top", 0, copy_index)
    assert copy is not None and (copy.stability, copy.rank_low, copy.rank_high) == (1.0, 1, 1)
    assert report.resampling == Resampling.PROJECTION_SEED and report.resamples == 12
    boundary = report.get("top", 0, int(top[k - 1]))
    assert boundary is not None and 0.0 < boundary.stability < 1.0 and boundary.rank_high > k
    again = _run(wine_mlp.adapter, method, params, train, query, FitContext("stability-test", InMemoryArtifacts()),
                 resamples=12, k=k)[1]
    assert again.rows == report.rows


def test_checkpoint_bootstrap_is_tracin_over_the_drawn_checkpoints(wine_mlp: Trained) -> None:
    train, query, copy_index = _leaked(wine_mlp)
    checkpoints = [ModelAdapter(perturbed(wine_mlp.module, seed, 0.2), wine_mlp.adapter.task) for seed in range(4)]
    params = {"checkpoint_model_ids": ["a", "b", "c", "d"], "normalize": "relative", "last_layer": True}
    context = FitContext("stability-test", InMemoryArtifacts(), checkpoints=checkpoints)
    k = 5
    fitted: list[AttributionMethod] = []
    scores = attribute(wine_mlp.adapter, "tracin", params, train, context, queries=query, on_fitted=fitted.append)
    report = rank_stability(fitted[0], scores, train, StabilityParams(16), queries=query, k=k)
    assert report.resampling == Resampling.CHECKPOINT_BOOTSTRAP
    copy = report.get("top", 0, copy_index)
    assert copy is not None and copy.stability == 1.0 and copy.rank_high == 1
    figures = [report.get("top", 0, int(i)) for i in torch.argsort(scores[0], descending=True)[:k]]
    assert any(f is not None and f.stability < 1.0 for f in figures)
    # the first resample equals relative TracIn over the drawn multiset of checkpoints (seed + 1's draw)
    gen = torch.Generator().manual_seed(fitted[0].params.seed + 1)
    drawn = [checkpoints[int(c)] for c in torch.randint(4, (4,), generator=gen)]
    ids = {"checkpoint_model_ids": [str(i) for i in range(4)]}
    expected = attribute(wine_mlp.adapter, "tracin", {**params, **ids}, train,
                         FitContext("other", InMemoryArtifacts(), checkpoints=drawn), queries=query)
    first = next(_bootstrap(fitted[0], train, query, 1, False, False, no_progress))
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-6)
    self_report = rank_stability(fitted[0], attribute(wine_mlp.adapter, "tracin", params, train, context, queries=None,
                                                      self_influence=True),
                                 train, StabilityParams(8), queries=None, k=k, self_influence=True)
    assert len(self_report.rows) == 2 * k


def test_forward_inf_step_size_resamples(digits_lr: Trained) -> None:
    train, query, copy_index = _leaked(digits_lr, copy_of=3)
    context = FitContext("stability-test", InMemoryArtifacts())
    scores, report = _run(digits_lr.adapter, "forward_inf", {}, train, query, context, resamples=4, k=5)
    assert report.resampling == Resampling.STEP_SIZE
    lr = ForwardInfParams().for_task("classification").resolved().lr
    assert lr is not None
    assert report.values == pytest.approx(spread(lr, 2.0, 4))
    assert int(torch.argmax(scores[0])) == copy_index
    copy = report.get("top", 0, copy_index)
    assert copy is not None and copy.stability == 1.0


def test_influence_damping_resamples_reuse_the_fitted_curvature(digits_lr: Trained) -> None:
    train, query, copy_index = _leaked(digits_lr, copy_of=5)
    store = InMemoryArtifacts()
    context = FitContext("stability-test", store)
    fitted: list[AttributionMethod] = []
    scores = attribute(digits_lr.adapter, "influence", {"ihvp": "exact"}, train, context, queries=query,
                       on_fitted=fitted.append)
    fits = {key for key in store.data if key.startswith("attr:ihvp")}
    report = rank_stability(fitted[0], scores, train, StabilityParams(4), queries=query, k=5)
    assert {key for key in store.data if key.startswith("attr:ihvp")} == fits  # damping applies at solve time
    assert report.resampling == Resampling.DAMPING
    assert report.values == pytest.approx(spread(context.extras["damping"], 10.0, 4))
    assert len(report.rows) == 10
    assert all(0.0 <= f.stability <= 1.0 and f.rank_low <= f.rank_high for f in report.rows.values())
    copy = report.get("top", 0, copy_index)
    assert int(torch.argmax(scores[0])) == copy_index and copy is not None and copy.stability == 1.0


def test_unprojected_params_are_refused(wine_mlp: Trained) -> None:
    params: MethodParams = parse_params("trak", {"projection_dim": 10_000})
    assert resampling_for("trak", params) == Resampling.PROJECTION_SEED
    train, query, _ = _leaked(wine_mlp)
    with pytest.raises(StabilityError, match="not projected"):
        _run(wine_mlp.adapter, "trak", {"projection_dim": 10_000}, train, query,
             FitContext("stability-test", InMemoryArtifacts()), resamples=2, k=3)


@pytest.mark.parametrize(("method", "params", "resampling"), [
    ("influence", {"ihvp": "lissa", "lissa_depth": 50, "damping": 0.05}, Resampling.LISSA_SEED),
    ("forward_inf", {"unlearning": "newton", "ihvp": "exact"}, Resampling.DAMPING),
    ("integrated_influence", {"ihvp": "exact", "steps": 2, "unlearn_steps": 2}, Resampling.DAMPING),
    ("forward_inf", {"auto": True}, Resampling.STEP_SIZE),
])
def test_each_documented_resampling_runs_and_reports_its_values(
    wine_mlp: Trained, method: str, params: dict[str, object], resampling: Resampling
) -> None:
    train, query, _ = _leaked(wine_mlp)
    context = FitContext("stability-test", InMemoryArtifacts())
    fitted: list[AttributionMethod] = []
    scores = attribute(wine_mlp.adapter, method, params, train, context, queries=query, on_fitted=fitted.append)
    report = rank_stability(fitted[0], scores, train, StabilityParams(3), queries=query, k=4)
    assert report.resampling == resampling and report.resamples == 3 and len(report.rows) == 8
    if resampling == Resampling.LISSA_SEED:
        assert report.values == [1.0, 2.0, 3.0]
    elif resampling == Resampling.DAMPING:
        assert report.values == pytest.approx(spread(context.extras["damping"], 10.0, 3))
    else:  # auto: around the chosen step size
        assert report.values == pytest.approx(spread(context.extras["auto"]["lr"], 2.0, 3))
    assert all(0.0 <= f.stability <= 1.0 and 1 <= f.rank_low <= f.rank_high for f in report.rows.values())


def test_a_later_query_reuses_the_resampled_fits(wine_mlp: Trained) -> None:
    """TRAK's per-seed fits land in the artifact store: another query's R resamples refit nothing."""
    train = wine_mlp.train
    store = InMemoryArtifacts()
    params = {"projection_dim": 16}

    def stability_of(query_row: int) -> StabilityReport:
        fitted: list[AttributionMethod] = []
        query = wine_mlp.test_batch([query_row])
        scores = attribute(wine_mlp.adapter, "trak", params, train, FitContext("reuse", store), queries=query,
                           on_fitted=fitted.append)
        return rank_stability(fitted[0], scores, train, StabilityParams(4), queries=query, k=3)

    stability_of(0)
    fits = {key for key in store.data if key.startswith("attr:trak")}
    assert len(fits) == 5  # the reported seed and 4 resampled seeds
    stability_of(1)
    assert {key for key in store.data if key.startswith("attr:trak")} == fits
