"""Candidate default changes, measured on the VALIDATION points of Q3, Q4 and Q6 only.

Each study's own setup (data, model, training, checkpoints, fair-protocol split) is rebuilt
with its code (`benchmarks.leakage_setup`, `benchmarks.q4_mislabel`, `benchmarks.q6_lds_neural`,
full-mode sizes), and each candidate configuration is scored on the validation points
only — never the evaluated points the committed reports quote — so what this script
finds may choose a default without looking at a reported figure:

- Q4 (AUC of flipped labels over the 300 validation rows): self-influence of the defaults,
  TracIn with every layer and with the last layer (with and without the checkpoints), TRAK
  without margin, Forward-INF's self-influence over the training checkpoints
  (`Σ_c η_c s(θ_c, z_i)`, `ForwardInf.checkpoint_self_influence`), and `auto`;
- Q6 (mean LDS over the 10 validation queries; the 50 subsets retrained on the validation
  queries only): TracIn every layer vs last layer, relative and raw, `auto`, and raw influence
  (exact and EK-FAC) at each `relative_damping` of `COUNTERFACTUAL_DAMPINGS` — what
  `auto`'s `goal: "counterfactual"` rule runs (`attribution/methods/auto.py`);
- Q3 (top-1 rate of the 10 validation copies, MLP): TracIn every layer vs last layer, `auto`.

    OMP_NUM_THREADS=1 python -m benchmarks.defaults_validation [q4 q6 q3] [--out /tmp/x.json]

Prints one line per (study, candidate) and writes them as JSON. Not a report: nothing here
is written under `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attribution.evaluation import (
    leakage_detection,
    linear_datamodeling_score,
    retrained_losses,
    roc_auc,
    sample_subsets,
)
from attribution.methods.base import FitContext
from attribution.model import ModelAdapter
from attribution.pipeline import attribute
from benchmarks.common import Split, adapter, digits_split, fit_adam, fit_context, mlp
from benchmarks.fair import Points
from benchmarks.leakage_setup import leaked_digits, train_models

Result = dict[str, Any]
# `relative_damping` candidates for the counterfactual (LDS) question: λ = r · tr(G)/P
COUNTERFACTUAL_DAMPINGS = (0.01, 0.1, 0.3, 1.0, 3.0)
Candidate = tuple[str, str, dict[str, Any], bool]  # (label, method, params, with the checkpoints)


def q4() -> list[Result]:
    from benchmarks.q4_mislabel import FLIP_RATE, HIDDEN, flip_labels

    n_train = 900
    split = digits_split(n_train=n_train)
    noisy, flipped = flip_labels(split.y_train, FLIP_RATE, seed=0)
    train = Split(split.x_train, noisy, split.x_test, split.y_test).train
    torch.manual_seed(0)
    module, trajectory = fit_adam(mlp([64, HIDDEN, 10], torch.nn.ReLU), split.x_train, noisy, epochs=300,
                                  checkpoints=5)
    model = adapter(module)
    validation = Points.split(n_train, n_train // 3).validation

    def auc(scores: Tensor) -> float:
        return roc_auc(scores.reshape(-1)[validation], flipped[validation])

    candidates: list[Candidate] = [
        ("forward_inf (default)", "forward_inf", {}, False),
        ("forward_inf gradient_norm", "forward_inf", {"self_influence_mode": "gradient_norm"}, False),
        ("forward_inf (default) over the checkpoints", "forward_inf", {}, True),
        ("forward_inf gradient_norm over the checkpoints", "forward_inf", {"self_influence_mode": "gradient_norm"},
         True),
        ("tracin every layer (checkpoints)", "tracin", {"last_layer": False}, True),
        ("tracin last_layer (checkpoints)", "tracin", {"last_layer": True}, True),
        ("tracin default (checkpoints)", "tracin", {}, True),
        ("tracin every layer (final only)", "tracin", {"last_layer": False}, False),
        ("tracin last_layer (final only)", "tracin", {"last_layer": True}, False),
        ("trak (default)", "trak", {}, False),
        ("trak use_margin=false", "trak", {"use_margin": False}, False),
        ("influence (default)", "influence", {}, False),
        ("auto (checkpoints)", "auto", {}, True),
        ("auto (final only)", "auto", {}, False),
    ]
    out = [_self_influence_row("q4", label, method, params, model, train,
                               fit_context(f"q4v:{label}", trajectory if ckpt else None), auc)
           for label, method, params, ckpt in candidates]
    out.append(_row("q4", "training loss (baseline)", "AUC", auc(model.losses(train)), 0.0))
    return out


def _self_influence_row(study: str, label: str, method: str, params: dict[str, Any], model: ModelAdapter,
                        train: Any, context: FitContext, statistic: Callable[[Tensor], float]) -> Result:
    started = time.perf_counter()
    scores = attribute(model, method, params, train, context, queries=None, self_influence=True)
    row = _row(study, label, "AUC", statistic(scores), time.perf_counter() - started)
    if "auto" in context.extras and method == "auto":
        row["auto"] = {k: v for k, v in context.extras["auto"].items() if k != "reason"}
    return row


def q6() -> list[Result]:
    from benchmarks.q6_lds_neural import train_mlp

    n_train, n_queries, n_validation, num_subsets, epochs = 500, 50, 10, 50, 300
    split = digits_split(n_train=n_train)
    module, trajectory = train_mlp(split.x_train, split.y_train, epochs, checkpoints=5)
    model = adapter(module)
    validation = Points.split(n_queries, n_validation).validation  # the study's split of its 50 queries
    queries = split.test_batch(validation)
    subsets = sample_subsets(n_train, num_subsets, fraction=0.5, seed=0)
    losses = retrained_losses(lambda mask: adapter(train_mlp(split.x_train[mask], split.y_train[mask], epochs)[0]),
                              subsets, queries)

    def lds(scores: Tensor) -> float:
        return float(linear_datamodeling_score(scores, subsets, losses).per_query.nanmean())

    candidates: list[Candidate] = [
        ("forward_inf (default)", "forward_inf", {}, False),
        ("tracin every layer (checkpoints)", "tracin", {"last_layer": False}, True),
        ("tracin last_layer (checkpoints)", "tracin", {"last_layer": True}, True),
        ("tracin default (checkpoints)", "tracin", {}, True),
        ("tracin every layer normalize=none (checkpoints)", "tracin", {"last_layer": False, "normalize": "none"},
         True),
        ("tracin last_layer normalize=none (checkpoints)", "tracin", {"last_layer": True, "normalize": "none"}, True),
        ("tracin every layer (final only)", "tracin", {"last_layer": False}, False),
        ("tracin last_layer (final only)", "tracin", {"last_layer": True}, False),
        ("auto (checkpoints)", "auto", {}, True),
        *[(f"influence {ihvp} normalize=none relative_damping={r}", "influence",
           {"ihvp": ihvp, "normalize": "none", "relative_damping": r}, False)
          for ihvp in ("exact", "ekfac") for r in COUNTERFACTUAL_DAMPINGS],
        ("auto goal=counterfactual", "auto", {"goal": "counterfactual"}, False),
    ]
    return [_query_row("q6", "LDS", label, method, params, model, split.train,
                       fit_context(f"q6v:{label}", trajectory if ckpt else None), queries, lds)
            for label, method, params, ckpt in candidates]


def q3() -> list[Result]:
    data = leaked_digits(600, 40, 10)
    trained = train_models(data, epochs=300, hidden=32)[0]
    copies = data.copies(data.validation)

    def top1(scores: Tensor) -> float:
        return float((leakage_detection(scores, copies).ranks == 1).double().mean())

    candidates: list[Candidate] = [
        ("forward_inf (default)", "forward_inf", {}, False),
        ("tracin every layer (checkpoints)", "tracin", {"last_layer": False}, True),
        ("tracin last_layer (checkpoints)", "tracin", {"last_layer": True}, True),
        ("tracin default (checkpoints)", "tracin", {}, True),
        ("tracin every layer (final only)", "tracin", {"last_layer": False}, False),
        ("tracin last_layer (final only)", "tracin", {"last_layer": True}, False),
        ("auto (checkpoints)", "auto", {}, True),
    ]
    return [_query_row("q3", "top-1", label, method, params, trained.model, data.train,
                       fit_context(f"q3v:{label}", trained.trajectory if ckpt else None),
                       data.queries(data.validation), top1)
            for label, method, params, ckpt in candidates]


def _query_row(study: str, metric: str, label: str, method: str, params: dict[str, Any], model: ModelAdapter,
               train: Any, context: FitContext, queries: Any, statistic: Callable[[Tensor], float]) -> Result:
    started = time.perf_counter()
    scores = attribute(model, method, params, train, context, queries=queries, per_sample=True)
    row = _row(study, label, metric, statistic(scores), time.perf_counter() - started)
    if method == "auto":
        row["auto"] = {k: v for k, v in context.extras["auto"].items() if k != "reason"}
    return row


def _row(study: str, label: str, metric: str, value: float, seconds: float) -> Result:
    row = {"study": study, "candidate": label, "metric": metric,
           "validation": None if math.isnan(value) else round(value, 4), "seconds": round(seconds, 2)}
    print(f"{study}  {label:<55} validation {metric} {value:.4f}  ({seconds:.1f} s)", flush=True)
    return row


STUDIES: dict[str, Callable[[], list[Result]]] = {"q4": q4, "q6": q6, "q3": q3}


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("studies", nargs="*", help=f"any of {', '.join(STUDIES)} (default: all)")
    parser.add_argument("--out", default="/tmp/defaults-validation.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.studies) - set(STUDIES))
    if unknown:
        parser.error(f"unknown study {unknown[0]}; valid: {', '.join(STUDIES)}")
    torch.set_num_threads(1)
    results = [row for study in (args.studies or list(STUDIES)) for row in STUDIES[study]()]
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
