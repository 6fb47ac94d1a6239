"""The cost model: phases per method grow with what they should, gradients cost the parameters
differentiated, warm artifacts cost nothing, the committed coefficients load, and the fit
recovers known coefficients."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from attribution.methods.registry import available_methods, parse_params
from attribution.structure import ModelStructure
from benchmarks.cost_fit import TIME_COLUMNS, fit_nnls
from benchmarks.speed_common import mlp
from service.costs.model import (
    COEFFICIENTS_FILE,
    MEMORY_TERMS,
    Coefficients,
    JobShape,
    PassKind,
    design_row,
    estimate,
)
from service.costs.plan import memory_sizes, plan
from service.costs.tracked import tracked_parameters

SHAPE = JobShape(task="classification", num_rows=10_000, num_queries=2, num_parameters=5_000)


def coefficients(seconds: float = 1e-9) -> Coefficients:
    """Every kind at the same price, so a prediction is proportional to the work."""
    return Coefficients({k.value: seconds for k in PassKind}, 0.0, 0.0, 0.0, {t: 1.0 for t in MEMORY_TERMS}, 0.0)


def predicted(method: str, params: dict[str, object], shape: JobShape = SHAPE, warm: bool = False) -> float:
    parsed = parse_params(method, params)
    phases, _ = plan(method, parsed, shape)
    artifacts = {p.artifact for p in phases if p.artifact} if warm else set()
    return estimate(phases, memory_sizes(method, parsed, shape, phases), coefficients(), warm=artifacts).seconds


def test_the_committed_coefficients_load_and_cover_every_kind() -> None:
    loaded = Coefficients.load()
    assert set(loaded.seconds_per_unit) == {k.value for k in PassKind}
    assert all(v >= 0 for v in loaded.seconds_per_unit.values())
    assert "machine" in loaded.source and "torch" in loaded.source
    assert json.loads(COEFFICIENTS_FILE.read_text())["source"] == loaded.source


def test_incomplete_coefficients_are_refused(tmp_path: Path) -> None:
    data = coefficients().to_dict()
    del data["seconds_per_unit"]["forward"]
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="forward"):
        Coefficients.load(tmp_path / "c.json")
    older = coefficients().to_dict()
    del older["seconds_per_sample_row"]  # fitted before the per-sample row term: refit, not a silent 0
    (tmp_path / "c.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="seconds_per_sample_row"):
        Coefficients.load(tmp_path / "c.json")


@pytest.mark.parametrize("method", available_methods())
def test_every_method_has_a_plan_with_its_defaults(method: str) -> None:
    params = {"normalize": "none"} if method in ("trackstar",) else {}
    phases, _ = plan(method, parse_params(method, params), SHAPE)
    assert phases and all(p.rows >= 0 and p.passes >= 1 and p.width >= 1 for p in phases)


@pytest.mark.parametrize(("method", "params"), [
    ("forward_inf", {}), ("forward_inf", {"normalize": "none", "steps": 5}), ("influence", {"ihvp": "cg"}),
    ("influence", {"ihvp": "ekfac"}), ("tracin", {}), ("trak", {"projection_dim": 64}),
    ("gradient_similarity", {}), ("trackstar", {"projection_dim": 64}),
    ("integrated_influence", {"ihvp": "ekfac"}),
])
def test_cost_grows_with_the_number_of_rows(method: str, params: dict[str, object]) -> None:
    small = JobShape(task="classification", num_rows=1_000, num_queries=2, num_parameters=5_000)
    assert predicted(method, params, small) < predicted(method, params, SHAPE)


def test_forward_inf_cost_grows_with_steps_and_per_sample_queries() -> None:
    one, many = (predicted("forward_inf", {"normalize": "none", "steps": k}) for k in (1, 50))
    assert one < many
    per_sample = JobShape(task="classification", num_rows=10_000, num_queries=8, num_parameters=5_000,
                          per_sample=True)
    assert predicted("forward_inf", {}) < predicted("forward_inf", {}, per_sample)
    phases, _ = plan("forward_inf", parse_params("forward_inf", {}), per_sample)
    sweep = next(p for p in phases if p.name == "sweep")
    assert (sweep.rows, sweep.passes) == (10_000, 8)


def test_cg_solves_grow_with_the_iteration_cap() -> None:
    assert predicted("influence", {"ihvp": "cg", "cg_max_iter": 10}) < predicted(
        "influence", {"ihvp": "cg", "cg_max_iter": 200})


def test_warm_artifacts_cost_nothing_and_a_warm_query_is_cheaper() -> None:
    for method, params in [("forward_inf", {}), ("influence", {}), ("trak", {"projection_dim": 64}),
                           ("trackstar", {"projection_dim": 64})]:
        cold, warm = predicted(method, params), predicted(method, params, warm=True)
        assert 0 < warm < cold, method
    parsed = parse_params("forward_inf", {})
    phases, _ = plan("forward_inf", parsed, SHAPE)
    result = estimate(phases, memory_sizes("forward_inf", parsed, SHAPE, phases), coefficients(),
                      warm={"base_losses"})
    assert result.artifacts["base_losses"] is True and result.artifacts["relative_norm"] is False
    assert result.rows_x_passes == result.cold_rows_x_passes - SHAPE.num_rows


def test_auto_ihvp_resolves_like_the_method() -> None:
    exact = plan("influence", parse_params("influence", {}), SHAPE)[0]
    assert any(p.name == "curvature_eigh" for p in exact)
    big = JobShape(task="classification", num_rows=1_000, num_queries=1, num_parameters=50_000)
    assert any(p.name == "kronecker_factors" for p in plan("influence", parse_params("influence", {}), big)[0])
    unfactored = JobShape(task="classification", num_rows=1_000, num_queries=1, num_parameters=50_000,
                          kfac_supported=False)
    phases = plan("influence", parse_params("influence", {"normalize": "none"}), unfactored)[0]
    assert any(p.name == "ihvp_solve" and p.kind is PassKind.CURVATURE for p in phases)


def test_memory_grows_with_rows_and_exact_curvature() -> None:
    parsed = parse_params("influence", {"ihvp": "exact"})
    phases, _ = plan("influence", parsed, SHAPE)
    sizes = memory_sizes("influence", parsed, SHAPE, phases)
    assert sizes.dense == 2 * 8 * SHAPE.num_parameters ** 2
    small = JobShape(task="classification", num_rows=10, num_queries=2, num_parameters=5_000)
    assert memory_sizes("influence", parsed, small, phases).score_rows < sizes.score_rows


def test_the_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(0)
    truth = {c: 0.0 for c in TIME_COLUMNS}
    truth.update(forward=2e-9, gradient=7e-9, overhead=0.01)
    rows = []
    for _ in range(40):
        row = {c: 0.0 for c in TIME_COLUMNS}
        row.update(forward=float(rng.uniform(1e6, 1e9)), gradient=float(rng.uniform(1e6, 1e9)), overhead=1.0)
        rows.append(row)
    measured = [sum(truth[c] * row[c] for c in TIME_COLUMNS) for row in rows]
    fitted = fit_nnls(rows, measured, TIME_COLUMNS)
    for column in ("forward", "gradient", "overhead"):
        assert fitted[column] == pytest.approx(truth[column], rel=1e-6)
    assert fitted["dense"] == 0.0


def test_design_rows_skip_warm_phases() -> None:
    parsed = parse_params("forward_inf", {"normalize": "none"})
    phases, _ = plan("forward_inf", parsed, SHAPE)
    cold = design_row(phases)
    warm = design_row(estimate(phases, memory_sizes("forward_inf", parsed, SHAPE, phases), coefficients(),
                               warm={"base_losses"}).phases)
    assert cold["forward"] - warm["forward"] == SHAPE.num_rows * SHAPE.num_parameters


def test_a_method_without_a_plan_is_estimated_as_a_gradient_sweep_and_says_so() -> None:
    params = parse_params("tracin", {})
    phases, notes = plan("some_new_method", params, SHAPE)
    assert [(p.kind, p.rows) for p in phases] == [(PassKind.GRADIENT, 2), (PassKind.GRADIENT, SHAPE.num_rows)]
    assert "no cost model for method some_new_method" in notes[0]
    sizes = memory_sizes("some_new_method", params, SHAPE, phases)
    assert sizes.gradient_batch == params.batch_size * SHAPE.num_parameters * 4


def _mlp_structure() -> ModelStructure:
    """A 64 → 32 → 10 MLP as registration records it: `0.*` (2,080 parameters) and `2.*` (330)."""
    return ModelStructure.of_module(mlp(64, (32,), 10))


def test_a_last_layer_tracin_job_differentiates_the_output_layer_only() -> None:
    structure = _mlp_structure()
    assert structure.num_tracked([]) == 2_410
    # TracIn's `last_layer` unset resolves to true on classifiers (the worker's `for_task`), false otherwise
    assert tracked_parameters(parse_params("tracin", {}), "classification", structure) == 32 * 10 + 10
    assert tracked_parameters(parse_params("tracin", {}), "regression", structure) == 2_410
    assert tracked_parameters(parse_params("tracin", {"last_layer": False}), "classification", structure) == 2_410
    assert tracked_parameters(parse_params("gradient_similarity", {"last_layer": True}), "classification",
                              structure) == 330
    assert tracked_parameters(parse_params("influence", {"layers": ["0"]}), "classification", structure) == 2_080
    unrecorded = ModelStructure.from_dict({"parameters": list(structure.parameters)})  # registered before sizes
    assert tracked_parameters(parse_params("tracin", {}), "classification", unrecorded) is None
    assert ModelStructure.from_dict(structure.to_dict()) == structure


def test_gradients_cost_the_differentiated_parameters_and_forward_passes_the_whole_model() -> None:
    last = JobShape(task="classification", num_rows=1_000, num_queries=1, num_parameters=2_410,
                    tracked_parameters=330)
    phases, _ = plan("tracin", parse_params("tracin", {}), last)
    assert {p.width for p in phases if p.kind is PassKind.GRADIENT} == {330}
    full = JobShape(task="classification", num_rows=1_000, num_queries=1, num_parameters=2_410)
    assert predicted("tracin", {}, last) < predicted("tracin", {}, full)
    restricted = replace(full, tracked_parameters=2_080)
    phases, _ = plan("forward_inf", parse_params("forward_inf", {"layers": ["0"]}), restricted)
    widths = {p.kind: p.width for p in phases if p.kind in (PassKind.FORWARD, PassKind.DIRECTION)}
    assert widths == {PassKind.FORWARD: 2_410, PassKind.DIRECTION: 2_080}


def test_ekfac_default_damping_needs_no_trace_pass() -> None:
    names = {ihvp: {p.name for p in plan("influence", parse_params("influence", {"ihvp": ihvp}), SHAPE)[0]}
             for ihvp in ("ekfac", "kfac", "cg")}
    assert "curvature_trace" not in names["ekfac"]
    assert "curvature_trace" in names["kfac"] and "curvature_trace" in names["cg"]
    explicit = plan("influence", parse_params("influence", {"ihvp": "cg", "damping": 0.1}), SHAPE)[0]
    assert "curvature_trace" not in {p.name for p in explicit}


def test_per_sample_gradient_rows_pay_the_row_coefficient() -> None:
    phases, _ = plan("tracin", parse_params("tracin", {"normalize": "none"}), SHAPE)
    rows = sum(p.rows_x_passes for p in phases if p.kind is PassKind.GRADIENT)
    assert design_row(phases)["sample_rows"] == rows == SHAPE.num_rows + SHAPE.num_queries
    base = coefficients()
    with_rows = replace(base, seconds_per_sample_row=1e-3)
    memory = memory_sizes("tracin", parse_params("tracin", {}), SHAPE, phases)
    assert estimate(phases, memory, with_rows).seconds == pytest.approx(
        estimate(phases, memory, base).seconds + 1e-3 * rows)


def test_integrated_influence_unlearns_with_batched_steps_not_per_sample_gradients() -> None:
    parsed = parse_params("integrated_influence", {"ihvp": "ekfac", "unlearn_steps": 7})
    phases = {p.name: p for p in plan("integrated_influence", parsed, SHAPE)[0]}
    assert (phases["baseline_unlearning"].kind, phases["baseline_unlearning"].passes) == (PassKind.STEP, 7)
    batches = phases["baseline_unlearning_batches"]
    assert (batches.kind, batches.rows) == (PassKind.FORWARD, parsed.fit_batch_size + SHAPE.num_queries)
    assert phases["path_kronecker_factors"].kind is PassKind.KRONECKER
