"""Q5 — Linear Datamodeling Score on linear regression (Integrated Influence paper, Table 1).

Per trial: 100 training rows × 10 features, `y = xᵀw + ε` (`benchmarks.common.linear_problem`),
ordinary least squares with a bias (closed form); random 50% subsets of the rows refitted in
closed form; each method's per-query scores are compared with the subset refits' query losses
by `attribution.evaluation.linear_datamodeling_score`. Three noise settings (σn, σs), 100
trials each in full mode; the figure is the mean LDS over test points and trials.
Target: each method within ±0.02 of the paper's figure or better; the best method beats the
paper's best (Integrated Influence).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.evaluation import linear_datamodeling_score, retrained_losses, sample_subsets
from attribution.model import ModelAdapter
from benchmarks.cli import Options, Stopwatch, progress, run_study
from benchmarks.common import (
    LinearProblem,
    Trajectory,
    fit_context,
    linear_problem,
    regression_adapter,
)
from benchmarks.report import Report
from benchmarks.runner import describe, scores

STUDY = "q5_lds_linear"
SETTINGS = ((0.1, 1.0), (1.0, 1.0), (1.0, 0.1))  # (σn, σs)
N_TRAIN, DIM = 100, 10
GD_LR, GD_STEPS, CHECKPOINTS = 0.1, 100, 10
TOLERANCE = 0.02

# Integrated Influence paper, Table 1, per setting.
PAPER = {
    "Integrated Influence": (0.859, 0.744, 0.768),
    "influence": (0.856, 0.634, 0.423),
    "TracIn": (0.815, 0.607, 0.405),
}

METHODS: list[tuple[str, str, dict[str, Any], bool]] = [  # label, method, params, one query at a time
    ("Integrated Influence", "integrated_influence", {"ihvp": "exact"}, True),
    ("influence", "influence", {"ihvp": "exact"}, False),
    ("TracIn", "tracin", {}, False),
    ("TRAK", "trak", {}, False),
    ("Forward-INF, Algorithm 1 (K=5, α=0.01)", "forward_inf", {"steps": 5, "lr": 0.01}, False),
    ("Forward-INF, library defaults", "forward_inf", {}, False),
    ("gradient dot product", "gradient_similarity", {"similarity": "dot"}, False),
]


def least_squares(x: Tensor, y: Tensor) -> nn.Linear:
    """`nn.Linear(D, 1)` (float32) holding the float64 OLS fit with a bias."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [D + 1, 1]
    module = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        module.weight.copy_(solution[:-1, 0][None].float())
        module.bias.copy_(solution[-1].float())
    return module.eval()


def gradient_descent_trajectory(problem: LinearProblem) -> Trajectory:
    """TracIn checkpoints: full-batch GD from zero on the mean squared error (lr 0.1, 100 steps)."""
    module = nn.Linear(DIM, 1).double()
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    opt = torch.optim.SGD(module.parameters(), lr=GD_LR)
    trajectory = Trajectory()
    for step in range(1, GD_STEPS + 1):
        opt.zero_grad()
        ((module(problem.x_train) - problem.y_train) ** 2).mean().backward()
        opt.step()
        if step % (GD_STEPS // CHECKPOINTS) == 0:
            checkpoint = nn.Linear(DIM, 1)
            checkpoint.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
            trajectory.modules.append(checkpoint.eval())
            trajectory.lrs.append(GD_LR)
    return trajectory


def one_trial(problem: LinearProblem, num_subsets: int, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """Mean LDS over the test points per method, and seconds per query per method."""
    model = regression_adapter(least_squares(problem.x_train, problem.y_train))
    train = TensorTrainingSet(problem.x_train.float(), problem.y_train.float())
    queries = Batch(problem.x_test.float(), problem.y_test.float())
    subsets = sample_subsets(N_TRAIN, num_subsets, fraction=0.5, seed=seed)

    def retrain(mask: Tensor) -> ModelAdapter:
        return regression_adapter(least_squares(problem.x_train[mask], problem.y_train[mask]))

    losses = retrained_losses(retrain, subsets, queries)
    trajectory = gradient_descent_trajectory(problem)
    lds, seconds = {}, {}
    for label, method, params, one_at_a_time in METHODS:
        context = fit_context(f"q5:{seed}", trajectory if method == "tracin" else None, task=model.task)
        if one_at_a_time:
            runs = [scores(model, method, params, train, context, queries.slice(q, q + 1)) for q in range(len(queries))]
            score, elapsed = torch.cat([r.scores for r in runs]), sum(r.seconds for r in runs)
        else:
            run = scores(model, method, params, train, context, queries)
            score, elapsed = run.scores, run.seconds
        finite = torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)
        lds[label] = linear_datamodeling_score(finite, subsets, losses).mean
        seconds[label] = elapsed / len(queries)
    return lds, seconds


def run(options: Options) -> Report:
    trials, n_test, num_subsets = (2, 5, 20) if options.quick else (100, 8, 100)
    report = Report(STUDY, "Q5 — LDS on linear regression", options.quick)
    report.setup = (
        f"Per trial: {N_TRAIN} training and {n_test} test rows, {DIM} features x ~ N(0, I), weights w ~ N(0, σs² I), "
        f"targets y = xᵀw + ε, ε ~ N(0, σn²) (seeded per trial). Model: nn.Linear({DIM}, 1) with bias, ordinary least "
        f"squares in closed form, squared-error task. LDS: {num_subsets} random 50% subsets "
        f"(`attribution.evaluation.sample_subsets`), each refitted in closed form; query losses of the refits "
        f"(`retrained_losses`) against each method's per-query scores (`linear_datamodeling_score`), averaged over "
        f"the test points, then over {trials} trials per setting. TracIn uses {CHECKPOINTS} checkpoints of full-batch "
        f"gradient descent from zero (lr {GD_LR}, {GD_STEPS} steps). Integrated Influence runs one query at a time "
        f"(its baseline unlearns the query). Library defaults otherwise; exact iHVP for the influence methods."
    )
    table: dict[str, list[float]] = {label: [] for label, *_ in METHODS}
    timing: dict[str, list[float]] = {label: [] for label, *_ in METHODS}
    for setting, (noise, signal) in enumerate(SETTINGS):
        per_trial: dict[str, list[float]] = {label: [] for label, *_ in METHODS}
        with Stopwatch() as watch:
            for trial in progress(range(trials), f"σn={noise}, σs={signal}"):
                seed = 1000 * setting + trial
                problem = linear_problem(N_TRAIN, n_test, DIM, noise, signal, seed)
                lds, seconds = one_trial(problem, num_subsets, seed)
                for label in lds:
                    per_trial[label].append(lds[label])
                    timing[label].append(seconds[label])
        for label in table:
            table[label].append(float(np.nanmean(per_trial[label])))
        report.note(f"σn={noise}, σs={signal}: {trials} trials in {watch.seconds:.0f} s; standard error of the "
                    f"mean LDS ≈ {max(np.nanstd(v) / np.sqrt(len(v)) for v in per_trial.values()):.3f} (largest).")

    rows = []
    for label, method, params, _ in METHODS:
        paper = PAPER.get(label)
        rows.append([label, describe(method, params)] + [f"{v:.3f}" for v in table[label]]
                    + ([" / ".join(f"{p:.3f}" for p in paper)] if paper else ["—"]))
        report.timing(label, float(np.mean(timing[label])), "per query, fit included, mean over trials")
    report.table("Mean LDS per setting (σn, σs) = (0.1, 1) / (1, 1) / (1, 0.1)",
                 ["method", "params", "(0.1, 1)", "(1, 1)", "(1, 0.1)", "paper"], rows)
    for label, paper in PAPER.items():
        for k, (noise, signal) in enumerate(SETTINGS):
            ours = table[label][k]
            report.figure(f"{label}, σn={noise}, σs={signal}", ours, f"{paper[k]:.3f}", "IIF paper, Table 1",
                          f"≥ {paper[k] - TOLERANCE:.3f}", ours >= paper[k] - TOLERANCE)
    for k, (noise, signal) in enumerate(SETTINGS):
        best = max(table, key=lambda name: table[name][k])
        paper_best = PAPER["Integrated Influence"][k]
        report.figure(f"best method, σn={noise}, σs={signal} ({best})", table[best][k], f"{paper_best:.3f} (IIF)",
                      "IIF paper, Table 1", f"> {paper_best:.3f}", table[best][k] > paper_best)
    report.note(
        "Why the closed-form rows are flat across settings: for ordinary least squares the refit error "
        "ŵ_S − w = (X_Sᵀ X_S)⁻¹ X_Sᵀ ε_S does not involve w, and every query loss scales with σn², so the LDS of "
        "any method that is a function of the OLS fit and its gradients (influence, TRAK, gradient dot product) "
        "is the same in all three settings up to trial noise. Only methods with their own absolute step sizes "
        "(TracIn's gradient-descent path, Integrated Influence's unlearning, Forward-INF's K/α) see σs. The "
        "paper's spread across settings (IF 0.856 → 0.423) therefore comes from a model or fitting detail its "
        "table does not state (regularisation, or training by gradient descent rather than in closed form)."
    )
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours:.3f} (target {figure.target}).")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
