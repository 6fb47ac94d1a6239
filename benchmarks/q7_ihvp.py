"""Q7 — inverse-Hessian-vector-product estimators against the exact inverse (pyDVL wine notebook).

A 13-16-16-3 tanh MLP on wine; influence scores of every test point on every training row
(`attribute(..., "influence", per_sample=True)`) with each estimator — CG, LiSSA, Arnoldi,
K-FAC, EK-FAC — at the same damping as the exact damped Gauss-Newton inverse, compared by
Pearson correlation (`attribution.evaluation.pearson`) over all (query, row) pairs and, as
the pyDVL notebook does, over the mean influence of each training row across the queries.
Each estimator runs with its library defaults (LiSSA stops on its error bound, Arnoldi
adapts its Krylov dimension to the damping) and — CG and LiSSA — with the accuracy knob
raised until two consecutive settings agree (Pearson ≥ 0.999 with each other), a label-free
rule that never looks at the exact answer. Dampings: the library default λ₀, 10/100/1000 λ₀
and the notebook's absolute λ = 0.1.
Diagnostic for K-FAC/EK-FAC: the exact inverse of the layer-block-diagonal curvature
(`BlockDiagonalExactIHVP`), which they approximate, separates the cost of dropping
cross-layer curvature from the cost of the Kronecker factorisation inside each layer.
Targets: CG/LiSSA ≥ 0.995, Arnoldi ≥ 0.99, EK-FAC ≥ 0.96.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attribution.curvature import CurvatureOperator
from attribution.data import Batch, TrainingSet
from attribution.evaluation import pearson
from attribution.ihvp import EKFACIHVP, KFACIHVP, ArnoldiIHVP, BlockDiagonalExactIHVP, LissaIHVP
from attribution.methods.influence import InfluenceParams
from benchmarks.cli import Options, progress, run_study
from benchmarks.common import accuracy, adapter, fit_adam, fit_context, mlp, wine_split
from benchmarks.report import Report
from benchmarks.runner import Run, describe, scores

STUDY = "q7_ihvp"
AGREEMENT = 0.999
ESTIMATORS = ("cg", "lissa", "arnoldi", "kfac", "ekfac")
DAMPING_MULTIPLIERS = (1, 10, 100, 1000)
PYDVL_DAMPING = 0.1  # the notebook's `regularization` / `hessian_regularization` (absolute)
REFERENCE = {"cg": ("0.9975", 0.995), "lissa": ("0.9941", 0.995), "arnoldi": ("0.9876", 0.99),
             "ekfac": ("0.958", 0.96), "kfac": ("—", None)}
SOURCE = "pyDVL wine notebook"
# The accuracy knob of each estimator and the values tried in order (label-free refinement).
KNOBS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "cg": ("cg_tol", (1e-5, 1e-7, 1e-9)),
    "lissa": ("lissa_depth", (1000, 4000)),
}
FIXED_RANKS = (64, 256)  # Arnoldi with a fixed rank (the paper's compression; 64 was the old default)


def refine(run: Callable[[dict[str, Any]], Run], ihvp: str) -> tuple[dict[str, Any], Run, list[str]]:
    """Raise the estimator's knob until two consecutive settings agree; returns the last setting."""
    knob, values = KNOBS[ihvp]
    log: list[str] = []
    previous: Run | None = None
    params: dict[str, Any] = {}
    for value in values:
        params = {"ihvp": ihvp, knob: value}
        current = run(params)
        if previous is not None:
            agreement = pearson(previous.scores, current.scores)
            log.append(f"{knob}={value}: agreement with the previous setting {agreement:.5f}")
            if agreement >= AGREEMENT:
                return params, current, log
        previous = current
    if previous is None:
        raise ValueError(f"no values to try for {ihvp}")
    return params, previous, log


def kronecker_structure(op: CurvatureOperator, train: TrainingSet) -> list[list[str]]:
    """Per layer: EK-FAC's fitted eigenvalues against the diagonal of the exact block in the
    Kronecker eigenbasis, the off-diagonal share of that block, and K-FAC's `S ⊗ A` error."""
    ekfac, kfac = EKFACIHVP(op, 1.0), KFACIHVP(op, 1.0)
    ekfac.fit(train)
    kfac.fit(train)
    rows = []
    for i, layer in enumerate(ekfac.layers):
        flat = torch.arange(op.num_params)
        matrix = flat[layer.weight].reshape(layer.out_features, layer.in_features)
        if layer.bias is not None:
            matrix = torch.cat([matrix, flat[layer.bias][:, None]], dim=1)
        (block,) = op.dense_blocks(train, [matrix.reshape(-1)])  # row-major [W | b], K-FAC's layout
        qs, qa = ekfac.state[f"l{i}.qs"], ekfac.state[f"l{i}.qa"]
        rotated = torch.kron(qs, qa).T @ block @ torch.kron(qs, qa)
        diagonal = rotated.diagonal()
        fitted = ekfac.state[f"l{i}.lambda"].reshape(-1)
        s = kfac.state[f"l{i}.qs"] @ torch.diag(kfac.state[f"l{i}.ls"]) @ kfac.state[f"l{i}.qs"].T
        a = kfac.state[f"l{i}.qa"] @ torch.diag(kfac.state[f"l{i}.la"]) @ kfac.state[f"l{i}.qa"].T
        rows.append([
            f"layer {i} ({layer.out_features}×{layer.width})", str(len(diagonal)),
            f"{float((fitted - diagonal).norm() / diagonal.norm()):.1e}",
            f"{float((rotated - torch.diag(diagonal)).norm() / rotated.norm()):.3f}",
            f"{float((torch.kron(s, a) - block).norm() / block.norm()):.3f}",
        ])
    return rows


def run(options: Options) -> Report:
    report = Report(STUDY, "Q7 — iHVP estimators against the exact inverse (wine MLP)", options.quick)
    split = wine_split()
    torch.manual_seed(0)
    module, _ = fit_adam(mlp([13, 16, 16, 3]), split.x_train, split.y_train, epochs=300)
    model = adapter(module)
    queries = split.test_batch(torch.arange(8 if options.quick else len(split.y_test)))
    train = split.train

    def influence(params: dict[str, Any]) -> Run:
        return scores(model, "influence", params, train, fit_context(f"q7:{describe('influence', params)}"), queries)

    def damped_influence(params: dict[str, Any], damping: float) -> Run:
        return influence({**params, "damping": damping})

    defaults = InfluenceParams()
    op = CurvatureOperator(model, batch_size=defaults.fit_batch_size)  # the influence method's curvature
    query_grads = model.per_sample_grads(queries).double()
    train_grads = model.per_sample_grads(Batch(split.x_train, split.y_train)).double()

    def direct(estimator: Any) -> Tensor:
        """`[Q, N]` scores of an estimator built here (diagnostics outside the influence method)."""
        estimator.fit(train)
        return (estimator.solve(query_grads) @ train_grads.T).float()

    default_damping = float(influence({"ihvp": "exact"}).extras["damping"])
    spectrum = torch.linalg.eigvalsh(op.dense(train))
    top = float(spectrum[-1])
    multipliers = (1,) if options.quick else DAMPING_MULTIPLIERS
    dampings = [(f"{m}λ₀", m * default_damping) for m in multipliers] + [("λ = 0.1 (pyDVL)", PYDVL_DAMPING)]
    report.setup = (
        f"Wine (178 rows, 13 standardised features): {len(split.y_train)} training rows, {len(queries)} test queries. "
        f"Model: 13-16-16-3 tanh MLP ({model.num_params} parameters), full-batch AdamW 300 epochs, test accuracy "
        f"{accuracy(module, split.x_test, split.y_test):.3f}. Influence scores `[Q, N]` of every query on every "
        f"training row with Gauss-Newton curvature G; the reference is `ihvp=\"exact\"` (dense eigendecomposition of "
        f"G + λI) at the same damping λ as the estimator. G's spectrum: top eigenvalue μ_max = {top:.3g}, mean "
        f"tr(G)/P = {float(spectrum.mean()):.3g}, {int((spectrum > 1e-12 * top).sum())} of {model.num_params} "
        f"eigenvalues above 10⁻¹² μ_max (rank ≤ 2 per row for a 3-class softmax). λ: the library default λ₀ = "
        f"{default_damping:.3g} (1% of the mean eigenvalue; condition number (μ_max + λ₀)/λ₀ = "
        f"{(top + default_damping) / default_damping:,.0f}), "
        + (f"{', '.join(f'{m}λ₀' for m in multipliers[1:])}, " if len(multipliers) > 1 else "")
        + f"and λ = {PYDVL_DAMPING} = {PYDVL_DAMPING / top:.1f} μ_max, the absolute regularisation of the pyDVL "
        f"notebook (whose reference is the damped full Hessian, ours the damped Gauss-Newton matrix). Pearson over "
        f"all Q×N scores and, pyDVL's metric, over the N mean influences (each training row's score averaged "
        f"over the queries). Refinement at λ₀ (label-free, never compared with the exact answer): CG tolerance "
        f"and LiSSA depth cap are raised until two consecutive settings agree at Pearson ≥ {AGREEMENT}. "
        f"Block-diagonal diagnostic: `BlockDiagonalExactIHVP`, the exact damped inverse of G with cross-layer "
        f"blocks dropped (the structure K-FAC and EK-FAC approximate)."
    )
    structure = kronecker_structure(op, train)
    report.table("Kronecker structure of the exact layer blocks (damping-free)",
                 ["layer", "parameters", "EK-FAC Λ* vs diag(QᵀG_llQ), rel. error",
                  "off-diagonal share of QᵀG_llQ (Frobenius)", "K-FAC ‖S⊗A − G_ll‖/‖G_ll‖"], structure)
    shares = [float(row[3]) for row in structure]
    rows: list[list[str]] = []
    block_rows: list[list[str]] = []
    best: dict[str, tuple[float, str]] = {}
    overall_at: dict[str, dict[str, float]] = {}  # λ label → estimator (and "block") → Pearson vs exact

    for label, damping in dampings:
        at_default = label == "1λ₀"
        exact = influence({"ihvp": "exact", "damping": damping})
        report.timing(f"exact, {label}", exact.seconds / len(queries), "fit + solve + sweep, per query")
        block = direct(BlockDiagonalExactIHVP(op, damping))
        results: dict[str, Tensor] = {}

        def record(ihvp: str, setting: str, params: dict[str, Any], result: Run, detail: str = "",
                   label: str = label, exact: Run = exact) -> float:
            overall = pearson(result.scores, exact.scores)
            mean = pearson(result.scores.mean(0), exact.scores.mean(0))
            per_query = float(np.mean([pearson(result.scores[q], exact.scores[q]) for q in range(len(queries))]))
            rows.append([label, setting, describe("influence", {k: v for k, v in params.items() if k != "damping"}),
                         f"{overall:.5f}", f"{mean:.5f}", f"{per_query:.5f}", f"{result.seconds / len(queries):.4f}",
                         detail])
            report.timing(f"{ihvp}, {setting}, {label}", result.seconds / len(queries),
                          "fit + solve + sweep, per query")
            if label != dampings[-1][0] and overall > best.get(ihvp, (-2.0, ""))[0]:
                best[ihvp] = (overall, f"{setting}, λ = {label}")
            return mean

        for ihvp in progress(ESTIMATORS, f"estimators at {label}"):
            params = {"ihvp": ihvp, "damping": damping}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = influence(params)
            results[ihvp] = result.scores
            overall_at.setdefault(label, {})[ihvp] = pearson(result.scores, exact.scores)
            mean = record(ihvp, "library defaults", params, result, _detail(ihvp, op, train, damping, caught))
            overall = pearson(result.scores, exact.scores)
            if at_default:
                report.figure(f"{ihvp} Pearson vs exact (library defaults, λ₀)", overall, REFERENCE[ihvp][0],
                              SOURCE, *_target(ihvp, overall))
            if label == dampings[-1][0]:
                report.figure(f"{ihvp} Pearson of mean influence vs exact at λ = 0.1 (pyDVL's setting and metric)",
                              mean, REFERENCE[ihvp][0], SOURCE, *_target(ihvp, mean))
            if at_default and ihvp in KNOBS and not options.quick:
                refined_params, refined, log = refine(partial(damped_influence, damping=damping), ihvp)
                overall = pearson(refined.scores, exact.scores)
                record(ihvp, "refined", {**refined_params, "damping": damping}, refined)
                report.figure(f"{ihvp} Pearson vs exact (refined, λ₀)", overall, REFERENCE[ihvp][0], SOURCE,
                              *_target(ihvp, overall))
                report.note(f"{ihvp} refinement at λ₀: " + "; ".join(log) + ".")
            if at_default and ihvp == "arnoldi":
                for rank in FIXED_RANKS:
                    fixed = {"ihvp": ihvp, "arnoldi_rank": rank, "arnoldi_iterations": 2 * rank, "damping": damping}
                    record(ihvp, f"fixed rank {rank}", fixed, influence(fixed))
        overall_at[label]["block"] = pearson(block, exact.scores)
        overall_at[label]["ekfac_vs_block"] = pearson(results["ekfac"], block)
        block_rows.append([
            label, f"{pearson(block, exact.scores):.4f}", f"{pearson(block.mean(0), exact.scores.mean(0)):.4f}",
            *(f"{pearson(results[k], block):.4f} / {pearson(results[k], exact.scores):.4f}" for k in ("kfac", "ekfac")),
        ])
        if at_default:
            report.figure("block-diagonal exact Pearson vs exact (λ₀)", pearson(block, exact.scores), "—", "diagnostic")
            report.figure("ekfac Pearson vs block-diagonal exact (λ₀)", pearson(results["ekfac"], block), "—",
                          "diagnostic")
    for ihvp in ESTIMATORS:
        value, setting = best[ihvp]
        report.figure(f"{ihvp} Pearson vs exact, best setting over λ₀…{multipliers[-1]}λ₀ ({setting})", value,
                      REFERENCE[ihvp][0], SOURCE, *_target(ihvp, value))
    report.table("Every estimator and damping",
                 ["λ", "setting", "params", "Pearson (all pairs)", "Pearson (mean influence)",
                  "mean per-query Pearson", "s / query", "estimator state"], rows)
    report.table("Block-diagonal diagnostic: where K-FAC/EK-FAC lose accuracy (Pearson, all pairs unless noted)",
                 ["λ", "block-diagonal exact vs exact", "same, mean influence",
                  "K-FAC vs block-diagonal / vs exact", "EK-FAC vs block-diagonal / vs exact"], block_rows)
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours:.4f} (target {figure.target}).")
    _explain(report, op, train, default_damping, top, overall_at, (min(shares), max(shares)))
    return report


def _explain(report: Report, op: CurvatureOperator, train: TrainingSet, damping: float, top: float,
             overall_at: dict[str, dict[str, float]], shares: tuple[float, float]) -> None:
    """Why LiSSA and EK-FAC miss at λ₀ (numbers from this run)."""
    lissa = LissaIHVP(op, damping)
    lissa.bind(train)
    lissa.load_state(lissa.compute_state())
    later = [f"{label}: {values['lissa']:.4f}" for label, values in overall_at.items() if label != "1λ₀"]
    report.note(
        f"LiSSA at λ₀: the Neumann recursion contracts by only 1 − αλ ≈ 1 − 1/(1.1 κ) per step in the flattest "
        f"directions, and κ = (μ_max + λ₀)/λ₀ = {(top + damping) / damping:,.0f}; its error bound (tol "
        f"{lissa.tol:g}) needs about {lissa.required_depth():,} steps against the default cap of {lissa.depth} "
        f"(4,000 refined), at one mini-batch curvature product per step. CG needs ≈ √κ iterations and meets "
        f"the target with its defaults. LiSSA is correct but impractical at this condition number; at larger "
        f"dampings it converges (Pearson {', '.join(later)}).")
    at = overall_at["1λ₀"]
    heavy = overall_at[next(reversed(overall_at))]
    report.note(
        f"EK-FAC at λ₀ is not a bug: its fitted eigenvalues equal the diagonal of each exact layer block in the "
        f"Kronecker eigenbasis to ~1e-9 (structure table; tests check the same, and that K-FAC/EK-FAC equal the "
        f"exact block-diagonal inverse when one training row makes each block exactly S ⊗ A). The gap is the "
        f"approximation: {shares[0]:.0%}–{shares[1]:.0%} of each block's Frobenius norm lies off that "
        f"diagonal, so EK-FAC agrees with the "
        f"exact block-diagonal inverse only at {at['ekfac_vs_block']:.3f}, and dropping the cross-layer blocks "
        f"alone gives {at['block']:.3f} against the full inverse. At small λ both errors are amplified because "
        f"directions of small curvature are weighted by up to 1/λ; at λ = 0.1 (pyDVL's setting) both structures "
        f"agree with the exact inverse (block-diagonal {heavy['block']:.4f}, EK-FAC {heavy['ekfac']:.4f}).")


def _detail(ihvp: str, op: CurvatureOperator, train: TrainingSet, damping: float,
            caught: list[warnings.WarningMessage]) -> str:
    """What the adaptive estimators did: LiSSA's stop, Arnoldi's Krylov dimension."""
    if ihvp == "lissa":
        lissa = LissaIHVP(op, damping)
        lissa.bind(train)
        lissa.load_state(lissa.compute_state())
        stopped = any("LiSSA stopped" in str(w.message) for w in caught)
        return (f"{'cap reached' if stopped else 'converged'}; worst-case depth for tol "
                f"{lissa.tol:g}: {lissa.required_depth():,}")
    if ihvp == "arnoldi":
        arnoldi = ArnoldiIHVP(op, damping)
        arnoldi.fit(train)
        return f"Krylov dimension {arnoldi.state['basis'].shape[0]}"
    return ""


def _target(ihvp: str, value: float) -> tuple[str, bool | None]:
    target = REFERENCE[ihvp][1]
    return ("", None) if target is None else (f"≥ {target}", value >= target)


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
