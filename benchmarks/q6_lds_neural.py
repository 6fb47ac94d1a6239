"""Q6 — Linear Datamodeling Score on a neural network (IIF paper Table 2; dattri).

An MLP on digits; 100 random 50% subsets of the training rows (quick: 10), each retrained
with the same seed and schedule as the attributed model (full-batch AdamW, deterministic);
the query losses of the retrained models against every method's per-query scores give the
LDS (`attribution.evaluation.linear_datamodeling_score`), averaged over 100 test points
(quick: 10). Target: report every method; the best reaches LDS ≥ 0.45.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attribution.evaluation import linear_datamodeling_score, retrained_losses, sample_subsets
from attribution.model import ModelAdapter
from benchmarks.cli import Options, Stopwatch, fraction_bar, progress, run_study
from benchmarks.common import (
    Trajectory,
    accuracy,
    adapter,
    digits_split,
    fit_adam,
    fit_context,
    mlp,
)
from benchmarks.report import Report
from benchmarks.runner import describe, scores

STUDY = "q6_lds_neural"
TARGET = 0.45
HIDDEN = 32
ENSEMBLE = 5

# Integrated Influence paper, Table 2 (MNIST MLP) and dattri's MNIST MLP TRAK benchmark.
PAPER = {"Integrated Influence": "0.164", "TracIn": "0.138", "TRAK": "0.112 (IIF paper); ≈ 0.45 (dattri)",
         "influence": "0.104"}

# label, method, params, context ("final", "trajectory" or "ensemble")
METHODS: list[tuple[str, str, dict[str, Any], str]] = [
    ("Integrated Influence (EK-FAC, K=2)", "integrated_influence", {"ihvp": "ekfac", "steps": 2}, "final"),
    ("influence", "influence", {}, "final"),
    ("influence (EK-FAC)", "influence", {"ihvp": "ekfac"}, "final"),
    ("TracIn (5 checkpoints)", "tracin", {}, "trajectory"),
    ("TRAK (1 model)", "trak", {}, "final"),
    (f"TRAK ({ENSEMBLE}-model ensemble)", "trak", {}, "ensemble"),
    ("Forward-INF, Algorithm 1 (K=5, α=0.01)", "forward_inf", {"steps": 5, "lr": 0.01}, "final"),
    ("Forward-INF, library defaults", "forward_inf", {}, "final"),
    ("gradient dot product", "gradient_similarity", {"similarity": "dot"}, "final"),
    ("gradient cosine", "gradient_similarity", {}, "final"),
]


def train_mlp(x: Tensor, y: Tensor, epochs: int, seed: int = 0, checkpoints: int = 0) -> tuple[nn.Module, Trajectory]:
    torch.manual_seed(seed)
    return fit_adam(mlp([64, HIDDEN, 10]), x, y, epochs=epochs, seed=seed, checkpoints=checkpoints)


def run(options: Options) -> Report:
    n_train, n_queries, num_subsets, epochs = (300, 10, 10, 100) if options.quick else (1000, 100, 100, 300)
    report = Report(STUDY, "Q6 — LDS on a neural network (MLP on digits)", options.quick)
    split = digits_split(n_train=n_train)
    train = split.train
    with Stopwatch() as fit_watch:
        module, trajectory = train_mlp(split.x_train, split.y_train, epochs, checkpoints=5)
        ensemble = Trajectory([module] + [train_mlp(split.x_train, split.y_train, epochs, seed=s)[0]
                                          for s in range(1, ENSEMBLE)], [1.0] * ENSEMBLE)
    model = adapter(module)
    queries = split.test_batch(torch.arange(n_queries))
    subsets = sample_subsets(n_train, num_subsets, fraction=0.5, seed=0)

    def retrain(mask: Tensor) -> ModelAdapter:
        return adapter(train_mlp(split.x_train[mask], split.y_train[mask], epochs)[0])

    with Stopwatch() as retrain_watch, fraction_bar("subset retraining") as bar:
        losses = retrained_losses(retrain, subsets, queries, progress=bar)

    report.setup = (
        f"Digits scaled to [0, 1], {n_train} training rows. Model: 64-{HIDDEN}-10 tanh MLP, full-batch AdamW (lr 1e-2, "
        f"weight decay 1e-4, {epochs} epochs, seed 0; test accuracy {accuracy(module, split.x_test, split.y_test):.3f}; "
        f"{fit_watch.seconds:.0f} s with the ensemble). LDS: {num_subsets} random 50% subsets "
        f"(`sample_subsets`), each retrained with the same seed and schedule ({retrain_watch.seconds:.0f} s), query "
        f"losses of the first {n_queries} test points (`retrained_losses`), Spearman per query against each method's "
        f"summed scores (`linear_datamodeling_score`), averaged over queries. TracIn: 5 evenly spaced checkpoints "
        f"of the training run; TRAK ensemble: the model plus {ENSEMBLE - 1} more trained on all rows with seeds "
        f"1–{ENSEMBLE - 1}. Integrated Influence scores the queries per_sample: each query is unlearned on its own "
        f"and the curvature is refitted along its path. `influence` resolves `ihvp=auto` (the exact inverse at this "
        f"size); `influence (EK-FAC)` uses Integrated Influence's estimator."
    )
    rows, best = [], ("", -1.0)
    lds: dict[str, float] = {}
    for label, method, params, kind in progress(METHODS, "methods"):
        chosen = {"trajectory": trajectory, "ensemble": ensemble}.get(kind)
        context = fit_context(f"q6:{kind}", chosen)
        run_ = scores(model, method, params, train, context, queries)
        result = linear_datamodeling_score(run_.scores, subsets, losses)
        lds[label] = result.mean
        rows.append([label, describe(method, params), f"{result.mean:.4f}", f"{run_.seconds / n_queries:.4f}"])
        report.timing(label, run_.seconds / n_queries, "per query, fit included")
        paper = next((v for k, v in PAPER.items() if label.startswith(k)), None)
        if paper is not None:
            report.figure(f"{label} LDS", result.mean, paper, "IIF paper, Table 2" + ("; dattri" if "TRAK" in label else ""))
        if result.mean > best[1]:
            best = (label, result.mean)
    report.table("Every method", ["method", "params", "LDS", "s / query"], rows)
    report.figure(f"best method LDS over all {n_queries} queries ({best[0]})", best[1], "IIF 0.164 (IIF paper); TRAK ≈ 0.45 (dattri)",
                  "IIF paper, Table 2; dattri", f"≥ {TARGET}", best[1] >= TARGET)
    iif, same_estimator, exact = lds["Integrated Influence (EK-FAC, K=2)"], lds["influence (EK-FAC)"], lds["influence"]
    share = f"; {(same_estimator - exact) / (iif - exact):.0%} of it" if abs(iif - exact) > 1e-9 else ""
    report.note(
        f"Like for like: Integrated Influence {iif:.4f} vs influence on the same EK-FAC estimator {same_estimator:.4f} "
        f"(difference {iif - same_estimator:+.4f}). The gap to the `influence` row (exact inverse, {exact:.4f}) is "
        f"{iif - exact:+.4f}{share} is reached by influence alone once it uses EK-FAC, i.e. comes from the iHVP "
        f"estimator rather than the integrated path."
    )
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours:.4f} (target {figure.target}).")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
