"""Q1 — the mirrored influence hypothesis on a convex model (Forward-INF paper, Table 1).

Logistic regression (L2 = 1e-3, fitted to float64 convergence) on digits; the 10 test points
with the highest loss. For each, exact train→test influence (leave-one-out retraining of
every training row, `attribution.evaluation.loo`) against exact test→train influence
(refit with the test point added, loss change of every training row), correlated with
`attribution.evaluation.mirrored_correlation`. Target: Pearson ≥ 0.99.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution.evaluation import leave_one_out, mirrored_correlation
from benchmarks.cli import Options, Stopwatch, fraction_bar, progress, run_study
from benchmarks.mirror import logistic_regression
from benchmarks.plots import scatter_panels
from benchmarks.report import Report

STUDY = "q1_mirrored_convex"
TARGET = 0.99
NUM_QUERIES = 10


def run(options: Options) -> Report:
    n_train = 400 if options.quick else 1200
    rows_evaluated = 80 if options.quick else n_train
    report = Report(STUDY, "Q1 — Mirrored influence on a convex model", options.quick)

    with Stopwatch() as fit_watch:
        converged = logistic_regression(l2=1e-3, n_train=n_train)
    queries = converged.highest_loss_test_points(NUM_QUERIES)
    batch = converged.split.test_batch(queries)
    rows = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[:rows_evaluated].sort().values

    with Stopwatch() as loo_watch, fraction_bar("leave-one-out refits") as bar:
        loo = leave_one_out(converged.retrain, n_train, batch, rows=rows, progress=bar)
    with Stopwatch() as add_watch:
        mirrored = [converged.test_to_train(int(q))[rows] for q in progress(queries, "add-the-test-point refits")]

    correlations = [mirrored_correlation(loo.changes[k], mirrored[k]) for k in range(len(queries))]
    pearsons = np.array([c.pearson for c in correlations])
    spearmans = np.array([c.spearman for c in correlations])

    report.setup = (
        f"Multinomial logistic regression (nn.Linear 64→10, float64) on scikit-learn digits scaled to [0, 1]: "
        f"{n_train} training rows, {len(converged.split.y_test)} test rows (seeded split), objective "
        f"mean cross-entropy + (λ/2)‖θ‖² with λ = 1e-3, fitted by L-BFGS and Newton steps until "
        f"max|∇R| ≤ 1e-11 ({fit_watch.seconds:.1f} s). Queries: the {NUM_QUERIES} test points with the highest "
        f"loss. Train→test: exact leave-one-out change of each query's loss for {len(rows)} training rows "
        f"({'a seeded random subset' if len(rows) < n_train else 'every row'}; "
        f"`attribution.evaluation.leave_one_out`, {loo_watch.seconds:.1f} s). Test→train: refit with the query "
        f"added to the training set, change of each training row's loss ({add_watch.seconds:.1f} s). Both sides "
        f"use the product's sign (positive = the row supports the query). Every refit is exact: chord-Newton "
        f"iterations from θ̂ with the full Hessian's Cholesky factor until max|∇R| ≤ 1e-11. Correlations by "
        f"`attribution.evaluation.mirrored_correlation`, per query, then averaged."
    )
    met = float(pearsons.mean()) >= TARGET
    report.figure("Pearson, mean over 10 queries", float(pearsons.mean()),
                  "0.9975 (MNIST), 0.9673 (CIFAR-10)", "Forward-INF paper, Table 1", f"≥ {TARGET}", met)
    report.figure("Pearson, worst query", float(pearsons.min()), "—", "—", f"≥ {TARGET}", bool(pearsons.min() >= TARGET))
    report.figure("Spearman, mean over 10 queries", float(spearmans.mean()), "0.90", "Forward-INF paper, Table 1")
    report.table("Per query", ["test index", "query loss", "Pearson", "Spearman"], [
        [str(int(q)), f"{float(loo.full_losses[k]):.3f}", f"{pearsons[k]:.4f}", f"{spearmans[k]:.4f}"]
        for k, q in enumerate(queries)
    ])
    report.timing("exact leave-one-out (all queries at once)", loo_watch.seconds / len(queries),
                  f"{len(rows)} Newton refits, shared by the {len(queries)} queries")
    report.timing("exact add-the-test-point", add_watch.seconds / len(queries), "one Newton refit per query")
    if not met:
        report.note(f"The mean Pearson is {pearsons.mean():.4f}, {TARGET - pearsons.mean():.4f} below the target.")

    shown = [0, len(queries) // 2, len(queries) - 1]
    plot = scatter_panels(
        options.out / f"{STUDY}.png",
        [(f"test {int(queries[k])}: Pearson {pearsons[k]:.4f}", loo.changes[k].numpy(), mirrored[k].numpy())
         for k in shown],
        "train→test: L(θ₋ᵢ, z) − L(θ̂, z)", "test→train: L(θ̂, zᵢ) − L(θ₊z, zᵢ)",
    )
    report.plots.append(plot.name)
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
