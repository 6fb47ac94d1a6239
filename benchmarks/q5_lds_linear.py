"""Q5 — Linear Datamodeling Score on linear regression (Integrated Influence paper, Table 1).

Per trial: 100 training rows × 10 features, `y = xᵀw + ε` (`benchmarks.common.linear_problem`),
ordinary least squares with a bias (closed form); random 50% subsets of the rows refitted in
closed form; each method's per-query scores are compared with the subset refits' query losses
by `attribution.evaluation.linear_datamodeling_score`. Three noise settings (σn, σs), 100
trials each in full mode; the figure is the mean LDS over test points and trials.
Target: each method within ±0.02 of the paper's figure or better; the best method beats the
paper's best (Integrated Influence).

Reference rows, not methods: a linear datamodel fitted by least squares to the query losses
of further closed-form refits (the best any additive score can do on this LDS, estimated), and
two labelled diagnostics (a weaker Integrated Influence unlearning step; TracIn on its final
checkpoint) that explain the gaps; neither counts as a figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attribution.data import Batch, TensorTrainingSet
from attribution.evaluation import linear_datamodeling_score, retrained_losses, sample_subsets
from attribution.methods.integrated_influence import IntegratedInfluenceParams, unlearn
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
DATAMODEL_LABEL = "linear datamodel (least squares on further refits)"

# Integrated Influence paper, Table 1, per setting.
PAPER = {
    "Integrated Influence": (0.859, 0.744, 0.768),
    "influence": (0.856, 0.634, 0.423),
    "TracIn": (0.815, 0.607, 0.405),
}

# label, method, params, TracIn checkpoints ("all", "last", or "" for none). The paper's
# formulas are raw scores (`normalize: "none"`; RelatIF's relative scores, the library default for
# retrieval, are another quantity): only "Forward-INF, library defaults" keeps the defaults.
RAW: dict[str, Any] = {"normalize": "none"}
METHODS: list[tuple[str, str, dict[str, Any], str]] = [
    ("Integrated Influence", "integrated_influence", {"ihvp": "exact", **RAW}, ""),
    ("influence", "influence", {"ihvp": "exact", **RAW}, ""),
    ("TracIn", "tracin", {**RAW}, "all"),
    ("TRAK", "trak", {**RAW}, ""),
    ("Forward-INF, Algorithm 1 (K=5, α=0.01)", "forward_inf", {"steps": 5, "lr": 0.01, **RAW}, ""),
    ("Forward-INF, library defaults", "forward_inf", {}, ""),
    ("gradient dot product", "gradient_similarity", {"similarity": "dot", **RAW}, ""),
]
# Explanations of the gaps, reported but never counted as a method's figure.
DIAGNOSTICS: list[tuple[str, str, dict[str, Any], str]] = [
    ("Integrated Influence, unlearn_lr 0.001 (diagnostic)", "integrated_influence",
     {"ihvp": "exact", "unlearn_lr": 0.001, **RAW}, ""),
    ("TracIn, final checkpoint only (diagnostic)", "tracin", {**RAW}, "last"),
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


def datamodel_scores(problem: LinearProblem, num_fit: int, seed: int) -> Tensor:
    """`[Q, N]` scores of the best linear datamodel: least squares of the query losses of
    `num_fit` further closed-form refits on random 50% subsets against the subset masks
    (negated to the score convention, `predicted loss = −Σ_{i∈S} score_i`)."""
    x = torch.cat([problem.x_train, torch.ones(N_TRAIN, 1, dtype=problem.x_train.dtype)], dim=1)  # [N, D+1]
    y = problem.y_train[:, 0]
    order = torch.rand(num_fit, N_TRAIN, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    masks = torch.zeros(num_fit, N_TRAIN, dtype=x.dtype).scatter_(1, order[:, : N_TRAIN // 2], 1.0)  # [M, N]
    gram = (masks @ (x[:, :, None] * x[:, None, :]).reshape(N_TRAIN, -1)).reshape(num_fit, DIM + 1, DIM + 1)
    weights = torch.linalg.solve(gram, masks @ (x * y[:, None]))  # [M, D+1], OLS of every subset
    x_test = torch.cat([problem.x_test, torch.ones(len(problem.x_test), 1, dtype=x.dtype)], dim=1)
    losses = (weights @ x_test.T - problem.y_test[:, 0]) ** 2  # [M, Q]
    design = torch.cat([masks, torch.ones(num_fit, 1, dtype=x.dtype)], dim=1)
    coefficients = torch.linalg.lstsq(design, losses).solution[:-1]  # [N, Q]
    return -coefficients.T.float()


def unlearning_growth(model: ModelAdapter, train: TensorTrainingSet, queries: Batch) -> Tensor:
    """`[Q]` `|r_q(θ_u)| / |r_q(θ̂)|`: how far Integrated Influence's default unlearning step moves each
    query's residual (each query unlearned on its own)."""
    params = IntegratedInfluenceParams()
    growth = []
    for q in range(len(queries)):
        query = queries.slice(q, q + 1)
        with torch.no_grad():
            before, after = (float((m.module(query.inputs) - query.targets).abs().sum())
                             for m in (model, unlearn(model, query, train, params)))
        growth.append(after / before)
    return torch.tensor(growth)


def one_trial(problem: LinearProblem, num_subsets: int, num_fit: int,
              seed: int) -> tuple[dict[str, float], dict[str, float], Tensor]:
    """Mean LDS over the test points per method (plus the reference rows), seconds per query, and
    the query-residual growth of the default unlearning step."""
    model = regression_adapter(least_squares(problem.x_train, problem.y_train))
    train = TensorTrainingSet(problem.x_train.float(), problem.y_train.float())
    queries = Batch(problem.x_test.float(), problem.y_test.float())
    subsets = sample_subsets(N_TRAIN, num_subsets, fraction=0.5, seed=seed)

    def retrain(mask: Tensor) -> ModelAdapter:
        return regression_adapter(least_squares(problem.x_train[mask], problem.y_train[mask]))

    losses = retrained_losses(retrain, subsets, queries)
    trajectory = gradient_descent_trajectory(problem)
    checkpoints = {"all": trajectory, "last": Trajectory(trajectory.modules[-1:], trajectory.lrs[-1:]), "": None}
    lds, seconds = {}, {}
    for label, method, params, kind in METHODS + DIAGNOSTICS:
        context = fit_context(f"q5:{seed}", checkpoints[kind], task=model.task)
        run_ = scores(model, method, params, train, context, queries)
        finite = torch.nan_to_num(run_.scores, nan=0.0, posinf=0.0, neginf=0.0)
        lds[label] = linear_datamodeling_score(finite, subsets, losses).mean
        seconds[label] = run_.seconds / len(queries)
    lds[DATAMODEL_LABEL] = linear_datamodeling_score(datamodel_scores(problem, num_fit, seed), subsets, losses).mean
    return lds, seconds, unlearning_growth(model, train, queries)


def run(options: Options) -> Report:
    trials, n_test, num_subsets, num_fit = (2, 5, 20, 500) if options.quick else (100, 8, 100, 4000)
    report = Report(STUDY, "Q5 — LDS on linear regression", options.quick)
    report.setup = (
        f"Per trial: {N_TRAIN} training and {n_test} test rows, {DIM} features x ~ N(0, I), weights w ~ N(0, σs² I), "
        f"targets y = xᵀw + ε, ε ~ N(0, σn²) (seeded per trial). Model: nn.Linear({DIM}, 1) with bias, ordinary least "
        f"squares in closed form, squared-error task. LDS: {num_subsets} random 50% subsets "
        f"(`attribution.evaluation.sample_subsets`), each refitted in closed form; query losses of the refits "
        f"(`retrained_losses`) against each method's per-query scores (`linear_datamodeling_score`), averaged over "
        f"the test points, then over {trials} trials per setting. TracIn uses {CHECKPOINTS} checkpoints of full-batch "
        f"gradient descent from zero (lr {GD_LR}, {GD_STEPS} steps). Integrated Influence scores all queries "
        f"per_sample, which unlearns each query on its own. Library defaults otherwise; exact iHVP for the influence "
        f"methods. Reference row: a {DATAMODEL_LABEL}, fitted to the query losses of {num_fit} further closed-form "
        f"refits on random 50% subsets per trial and scored on the same evaluation subsets as every method."
    )
    labels = [label for label, *_ in METHODS + DIAGNOSTICS] + [DATAMODEL_LABEL]
    table: dict[str, list[float]] = {label: [] for label in labels}
    timing: dict[str, list[float]] = {label: [] for label, *_ in METHODS}
    growth: list[Tensor] = []
    for setting, (noise, signal) in enumerate(SETTINGS):
        per_trial: dict[str, list[float]] = {label: [] for label in labels}
        with Stopwatch() as watch:
            for trial in progress(range(trials), f"σn={noise}, σs={signal}"):
                seed = 1000 * setting + trial
                problem = linear_problem(N_TRAIN, n_test, DIM, noise, signal, seed)
                lds, seconds, residual_growth = one_trial(problem, num_subsets, num_fit, seed)
                growth.append(residual_growth)
                for label in lds:
                    per_trial[label].append(lds[label])
                for label in timing:
                    timing[label].append(seconds[label])
        for label in table:
            table[label].append(float(np.nanmean(per_trial[label])))
        report.note(f"σn={noise}, σs={signal}: {trials} trials in {watch.seconds:.0f} s; standard error of the "
                    f"mean LDS ≈ {max(np.nanstd(v) / np.sqrt(len(v)) for v in per_trial.values()):.3f} (largest).")

    rows = []
    for label, method, params, _ in METHODS + DIAGNOSTICS:
        paper = PAPER.get(label)
        rows.append([label, describe(method, params)] + [f"{v:.3f}" for v in table[label]]
                    + ([" / ".join(f"{p:.3f}" for p in paper)] if paper else ["—"]))
    rows.append([DATAMODEL_LABEL, f"{num_fit} refits per trial"] + [f"{v:.3f}" for v in table[DATAMODEL_LABEL]]
                + ["—"])
    for label in timing:
        report.timing(label, float(np.mean(timing[label])), "per query, fit included, mean over trials")
    report.table("Mean LDS per setting (σn, σs) = (0.1, 1) / (1, 1) / (1, 0.1)",
                 ["method", "params", "(0.1, 1)", "(1, 1)", "(1, 0.1)", "paper"], rows)
    for label, paper in PAPER.items():
        for k, (noise, signal) in enumerate(SETTINGS):
            ours = table[label][k]
            report.figure(f"{label}, σn={noise}, σs={signal}", ours, f"{paper[k]:.3f}", "IIF paper, Table 1",
                          f"≥ {paper[k] - TOLERANCE:.3f}", ours >= paper[k] - TOLERANCE)
    for k, (noise, signal) in enumerate(SETTINGS):
        best = max((label for label, *_ in METHODS), key=lambda name: table[name][k])
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
    ceiling = table[DATAMODEL_LABEL]
    above = [f"{label} {paper[k]:.3f} at (σn, σs) = ({noise}, {signal})" for label, paper in PAPER.items()
             for k, (noise, signal) in enumerate(SETTINGS) if paper[k] > ceiling[k] + TOLERANCE]
    report.note(
        f"Ceiling: the {DATAMODEL_LABEL} reaches {' / '.join(f'{v:.3f}' for v in ceiling)}. It is fitted to the "
        f"very losses the LDS ranks, so no additive attribution should do much better; it still carries estimation "
        f"error from {num_fit} refits for {N_TRAIN + 1} coefficients (in a separate check on 8 trials at (0.1, 1) "
        f"it rose from 0.807 with 5,000 refits to 0.810 with 20,000). Influence: "
        f"{' / '.join(f'{v:.3f}' for v in table['influence'])}. Paper figures more than {TOLERANCE} above the "
        f"ceiling: {'; '.join(above) if above else 'none'}. Such figures cannot come from this LDS quantity with "
        f"closed-form OLS refits; the paper's protocol text could not be retrieved here (only its abstract is in "
        f"the searchable corpus), so which detail differs (model, refits, or the quantity ranked) is unknown."
    )
    weak, grown = table["Integrated Influence, unlearn_lr 0.001 (diagnostic)"], torch.cat(growth)
    report.note(
        "Why Integrated Influence is below influence here (closed form, checked in "
        "tests/attribution/test_integrated_influence.py): for squared error on a linear model the curvature is "
        "constant, θ̂(y′) = θ_u exactly and ∇L_q is affine along the path, so the K-step score is "
        "2 r_q(θ_t̄) · x̃_qᵀ(G + λI)⁻¹x̃_i · 2(e_i + x̃_iᵀ(θ_u − θ̂)), t̄ = (K+1)/2K: a positive per-query rescaling "
        "of the influence-function score plus a term set by the unlearning step θ_u − θ̂ alone. The default "
        "unlearning (5 steps, lr 0.01, reg 1) weights the query like the whole training set; the query's curvature "
        "(2‖x̃_q‖² ≈ 2(D + 1) = 22) exceeds the training loss's (≈ 2), so the ascent grows geometrically: the query "
        f"residual grows {float(grown.median()):.1f}× (median over every query of every trial; quartiles "
        f"{float(grown.quantile(0.25)):.1f}–{float(grown.quantile(0.75)):.1f}), "
        "making x̃_iᵀ(θ_u − θ̂) as large as the residuals e_i. That extra term does not track "
        "subset refits. With a 10× smaller unlearning step Integrated Influence returns to "
        f"{' / '.join(f'{v:.3f}' for v in weak)} (→ influence as the step → 0). The code computes exactly the "
        "closed form; no step size makes it beat influence here, because influence is already at the datamodel "
        "ceiling. The default is left as it is: a smaller step only turns Integrated Influence into influence, "
        "which is not an improvement of the method (Q6 compares the two on the same EK-FAC estimator)."
    )
    final_only = table["TracIn, final checkpoint only (diagnostic)"]
    report.note(
        "TracIn: the gradient-descent trajectory is the one stated in the setup (from zero, lr 0.1, 100 full-batch "
        "steps, checkpoints every 10 steps; it converges to the OLS fit, contraction ≤ 0.91 per step). At "
        "σn = 0.1, σs = 1 the first checkpoints are still fitting the signal (residuals ≈ 0.1·‖w‖ ≫ σn), their "
        "gradient products are the largest terms of the sum and say how fast a subset fits w, which closed-form "
        "refits never see. On the final checkpoint alone TracIn is the gradient dot product at θ̂: "
        f"{' / '.join(f'{v:.3f}' for v in final_only)}. The checkpoint protocol is left as it is (the paper's "
        "could not be retrieved); the final-checkpoint row is a diagnostic, not the TracIn figure."
    )
    for figure in report.missed():
        report.note(f"Missed: {figure.name} = {figure.ours:.3f} (target {figure.target}).")
    return report


def main(argv: list[str] | None = None) -> Report:
    return run_study(run, __doc__ or STUDY, argv)


if __name__ == "__main__":
    main()
