"""Rank stability on leaked digits: do the stability figures say which top rows to trust, and at what cost?

Setup (`benchmarks.leakage_setup`): digits with test points copied into the training set, an
MLP 64-64-10 (ReLU, full-batch AdamW, 5 saved checkpoints). Each leaked test point is a query
(joint mode, top k = 5) for every method below, with `attribution.stability.rank_stability`
over R resamples of what the method resamples. Per method the report gives:

- top-1 is the copy: how often the reported top-1 row is the planted copy, split by the top-1
  row's stability (= 1.0 vs < 1.0) — if the figure is informative, stable top-1 rows are right
  more often than unstable ones;
- the copy's mean stability (rows ranked in the top k only) and the share of the other top-k
  rows with stability < 1;
- for projected methods, how many of the reported top-k rows are in the top k of the same
  method without projection (the exact gradients), split by stability — stable rows should be
  there more often, which is what "which top rows to trust" means here;
- the mean width `rank_high − rank_low` of the top-k rows' rank intervals;
- seconds per query of the reported run and of the R resamples.

    python -m benchmarks.stability_report --quick          # ~1 minute on an idle machine, report under /tmp/stability-report
    python -m benchmarks.stability_report --out /tmp/dir   # full: more rows, queries and resamples

It writes `stability_report.md` to `--out` (never to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution.methods.base import AttributionMethod
from attribution.pipeline import attribute
from attribution.stability import StabilityParams, StabilityReport, rank_stability
from benchmarks.common import adapter, fit_adam, fit_context, mlp
from benchmarks.leakage_setup import LeakedDigits, leaked_digits

K = 5
# label, method, params, with checkpoints, projected (the same method unprojected is the reference top-k)
METHODS: tuple[tuple[str, str, dict[str, Any], bool, bool], ...] = (
    ("tracin, projection_dim 64 (projection seeds)", "tracin", {"projection_dim": 64}, False, True),
    ("tracin, 5 checkpoints (checkpoint bootstrap)", "tracin", {"checkpoint_model_ids": ["c"] * 5}, True, False),
    ("trak, projection_dim 256 (projection seeds)", "trak", {"projection_dim": 256}, False, True),
    ("forward_inf, defaults (step sizes)", "forward_inf", {}, False, False),
    ("forward_inf, normalize none (step sizes)", "forward_inf", {"normalize": "none"}, False, False),
    ("influence, ihvp cg, 50 iterations (dampings)", "influence", {"ihvp": "cg", "cg_max_iter": 50}, False, False),
)


@dataclass
class Tally:
    stable_top1: list[bool] = field(default_factory=list)  # top-1 is the copy, for stable top-1 rows
    unstable_top1: list[bool] = field(default_factory=list)
    copy_stability: list[float] = field(default_factory=list)
    others_unstable: list[bool] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    stable_in_exact: list[bool] = field(default_factory=list)  # top-k rows in the unprojected top-k, stable rows
    unstable_in_exact: list[bool] = field(default_factory=list)
    reported_s: float = 0.0
    stability_s: float = 0.0
    queries: int = 0

    def add(self, report: StabilityReport, top: list[int], copy: int, exact: set[int] | None) -> None:
        figures = [report.get("top", 0, i) for i in top]
        for index, f in zip(top, figures, strict=True):
            if exact is not None and f is not None:
                (self.stable_in_exact if f.stability == 1.0 else self.unstable_in_exact).append(index in exact)
        first = figures[0]
        if first is not None:
            (self.stable_top1 if first.stability == 1.0 else self.unstable_top1).append(top[0] == copy)
        for index, f in zip(top, figures, strict=True):
            if f is None:
                continue
            self.widths.append(f.rank_high - f.rank_low)
            if index == copy:
                self.copy_stability.append(f.stability)
            else:
                self.others_unstable.append(f.stability < 1.0)


def _rate(values: list[bool]) -> str:
    return f"{sum(values)}/{len(values)}" if values else "—"


def _mean(values: list[float] | list[int]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "—"


def run(data: LeakedDigits, module: nn.Module, trajectory: Any, queries: torch.Tensor, resamples: int) -> dict[str, Tally]:
    model, train = adapter(module), data.train
    out: dict[str, Tally] = {}
    for label, method, params, with_checkpoints, projected in METHODS:
        tally = out.setdefault(label, Tally())
        context = fit_context(f"stability:{label}", trajectory if with_checkpoints else None)
        for test_index in queries.tolist():
            batch = data.queries(torch.tensor([test_index]))
            fitted: list[AttributionMethod] = []
            started = time.perf_counter()
            scores = attribute(model, method, params, train, context, queries=batch, on_fitted=fitted.append)
            resampled_at = time.perf_counter()
            report = rank_stability(fitted[0], scores.float(), train, StabilityParams(resamples), queries=batch, k=K)
            finished = time.perf_counter()
            top = torch.argsort(scores[0], descending=True, stable=True)[:K].tolist()
            exact = None
            if projected:
                reference = attribute(model, method, {**params, "projection_dim": None}, train, context, queries=batch)
                exact = set(torch.argsort(reference[0], descending=True, stable=True)[:K].tolist())
            tally.add(report, top, data.copy_of[test_index], exact)
            tally.reported_s += resampled_at - started
            tally.stability_s += finished - resampled_at
            tally.queries += 1
    return out


def markdown(tallies: dict[str, Tally], *, quick: bool, rows: int, resamples: int, seconds: float) -> str:
    lines = [f"# Rank stability on leaked digits{' (quick mode: indicative only)' if quick else ''}", "",
             f"Run time {seconds:.0f} s. MLP 64-64-10 on {rows} training rows (leaked copies included); "
             f"top k = {K}; R = {resamples} resamples; one query per leaked test point (joint mode). "
             "Definitions in `attribution/stability.py`.", "",
             "| method | top-1 is the copy, stable top-1 | top-1 is the copy, unstable top-1 | copy's mean stability "
             "| other top-k rows with stability < 1 | stable top-k rows in the unprojected top-k "
             "| unstable top-k rows in the unprojected top-k | mean rank-interval width | s/query reported "
             "| s/query R resamples |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, t in tallies.items():
        n = max(t.queries, 1)
        lines.append(f"| {label} | {_rate(t.stable_top1)} | {_rate(t.unstable_top1)} | {_mean(t.copy_stability)} "
                     f"| {_rate(t.others_unstable)} | {_rate(t.stable_in_exact)} | {_rate(t.unstable_in_exact)} "
                     f"| {_mean(t.widths)} | {t.reported_s / n:.3f} | {t.stability_s / n:.3f} |")
    lines += ["", "The fit artifacts of each method (features, curvature, training losses) are cached in one in-memory "
              "store per method, as the service's store does, so after the first query a resample costs its "
              "query-side work only; the first query's cost is in the averages."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="reduced run (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/stability-report"), help="report directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    n_train, evaluated, epochs, resamples = (300, 4, 100, 4) if args.quick else (1000, 30, 300, 16)
    data = leaked_digits(n_train, evaluated, 0, seed=0)
    torch.manual_seed(0)
    module, trajectory = fit_adam(mlp([64, 64, 10], nn.ReLU), data.x_train, data.y_train, epochs=epochs, seed=0,
                                  checkpoints=5)
    tallies = run(data, module, trajectory, data.evaluated, resamples)
    text = markdown(tallies, quick=args.quick, rows=len(data.y_train), resamples=resamples,
                    seconds=time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stability_report.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
