"""P9 — cost estimates: predicted vs measured seconds (and peak memory) across methods and sizes.

What `POST /v1/queries?dry_run=true` answers comes from `service.costs.model` with the committed
coefficients (`service/costs/coefficients.json`, fitted by `benchmarks/cost_fit.py` at
other sizes). This study measures every setting of `cost_runs.CONFIGS` — Forward-INF (relative
default, raw K = 1 and K = 20, per_sample, self-influence), influence functions (CG, EK-FAC,
exact, LiSSA), TracIn (full and projected), TRAK, gradient similarity, TrackStar, Integrated
Influence — at evaluation sizes (N × MLP widths) none of which the fit saw, each cold (fresh
artifact store) and warm (second query, cached artifacts), and compares the prediction with
the measured CPU seconds of the job's process (one intra-op thread; CPU time because the
machine is shared and wall time would measure the other jobs). A run counts as within 2×
when max(predicted / measured, measured / predicted) ≤ 2. Target: ≥ 90% of runs. Peak memory
(VmHWM above the resting process) is compared the same way and reported, without a target.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks.cli import Options, parse_options
from benchmarks.cost_runs import CONFIGS, Measured, cpu_note, grid, measure
from benchmarks.report import Report
from benchmarks.speed_common import machine
from service.costs.model import COEFFICIENTS_FILE, Coefficients

STUDY = "p9_cost_estimates"
TARGET = 0.9
EVAL_SIZES = [(1500, (32,)), (5000, (32,)), (1000, (96,)), (2500, (64, 64)), (12000, (24,))]
QUICK_SIZES = [(500, (32,)), (1500, (48,))]
MAX_SECONDS = 12.0
QUICK_MAX_SECONDS = 2.0


def ratio(predicted: float, measured: float) -> float:
    """max(p/m, m/p): 1 is exact, 2 is the target's edge."""
    if predicted <= 0 or measured <= 0:
        return float("inf")
    return max(predicted / measured, measured / predicted)


def points(runs: Sequence[Measured], coefficients: Coefficients) -> list[tuple[Measured, str, float, float]]:
    """(run, "cold"|"warm", predicted s, measured CPU s) for every successful run; warm only
    when the method caches something."""
    out = []
    for run in runs:
        if run.error:
            continue
        out.append((run, "cold", run.spec.predict(coefficients, warm=False).seconds, run.cold_cpu_s))
        phases, _ = run.spec.planned()
        if any(p.artifact is not None for p in phases):
            out.append((run, "warm", run.spec.predict(coefficients, warm=True).seconds, run.warm_cpu_s))
    return out


def run(options: Options, coefficients_path: Path = COEFFICIENTS_FILE) -> Report:
    coefficients = Coefficients.load(coefficients_path)
    sizes = QUICK_SIZES if options.quick else EVAL_SIZES
    specs = grid(CONFIGS, sizes, max_seconds=QUICK_MAX_SECONDS if options.quick else MAX_SECONDS, coefficients=coefficients)
    report = Report(STUDY, "P9 — predicted vs measured query cost (dry_run estimates)", options.quick)
    runs = []
    for i, spec in enumerate(specs, 1):
        measured = measure(spec)
        runs.append(measured)
        print(f"[{i}/{len(specs)}] N={spec.num_rows} P={spec.num_parameters} {spec.label}: "
              f"{measured.error or f'cold {measured.cold_cpu_s:.3f} s, warm {measured.warm_cpu_s:.3f} s'}", flush=True)
    compared = points(runs, coefficients)
    within = [ratio(p, m) <= 2.0 for _, _, p, m in compared]
    share = sum(within) / max(len(within), 1)
    memory = [(r, r.spec.predict(coefficients, warm=False).peak_memory_bytes) for r in runs if not r.error]
    memory_within = [ratio(float(p), float(r.peak_bytes)) <= 2.0 for r, p in memory if r.peak_bytes > 0]
    failed = [r for r in runs if r.error]

    report.setup = (
        f"{len(specs)} jobs ({len(CONFIGS)} settings × sizes N ∈ {sorted({n for n, _ in sizes})}, MLP 64→"
        f"{{{', '.join('-'.join(map(str, h)) for _, h in sizes)}}}→10; sizes the fit did not use), each run cold and "
        f"warm in a forked process: {len(compared)} compared points. Predictions: `service.costs.model` with "
        f"`{coefficients_path.name}` (fitted on {coefficients.source.get('machine', '?')}, fit sizes "
        f"{coefficients.source.get('sizes', '?')}). Measured: {cpu_note()}. "
        "A point is within 2× when max(predicted/measured, measured/predicted) ≤ 2. "
        f"Machine: {machine()}.")
    report.figure("runs with predicted seconds within 2× of measured", f"{share:.1%} of {len(within)}",
                  "—", "issue #15", f"≥ {TARGET:.0%}", share >= TARGET)
    report.figure("median predicted/measured ratio", statistics.median([p / m for _, _, p, m in compared if m > 0])
                  if compared else float("nan"), "—", "this run")
    if memory_within:
        report.figure("cold runs with predicted peak memory within 2×",
                      f"{sum(memory_within) / len(memory_within):.1%} of {len(memory_within)}", "—", "this run")

    by_method: dict[str, list[float]] = defaultdict(list)
    for run_, _, p, m in compared:
        by_method[run_.spec.method].append(ratio(p, m))
    report.table("Within 2× by method", ["method", "points", "within 2×", "worst ratio"],
                 [[method, str(len(r)), f"{sum(x <= 2 for x in r) / len(r):.0%}", f"{max(r):.2f}"]
                  for method, r in sorted(by_method.items())])
    report.table("Every point", ["job", "N", "P", "cache", "predicted s", "measured CPU s", "ratio"],
                 [[r.spec.label, str(r.spec.num_rows), str(r.spec.num_parameters), kind, f"{p:.3f}", f"{m:.3f}",
                   f"{ratio(p, m):.2f}"] for r, kind, p, m in compared])
    report.table("Peak memory (cold)", ["job", "N", "P", "predicted MiB", "measured MiB"],
                 [[r.spec.label, str(r.spec.num_rows), str(r.spec.num_parameters), f"{p / 2**20:.1f}",
                   f"{r.peak_bytes / 2**20:.1f}"] for r, p in memory])
    for r in failed:
        report.note(f"{r.spec.label} N={r.spec.num_rows}: not measured ({r.error})")
    report.note("CG and LiSSA solves are predicted at their iteration caps (cg_max_iter, lissa_depth); CG stopping "
                "early at its tolerance makes such predictions high. Forward-INF `stop: forgotten` is predicted at "
                "its cap K the same way. Runs under ~20 ms are dominated by per-call overheads and noise.")
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--coefficients", type=Path, default=COEFFICIENTS_FILE)
    known, rest = parser.parse_known_args(argv)
    options = parse_options(__doc__ or STUDY, rest)
    report = run(options, known.coefficients)
    path = report.write(options.out)
    print(f"wrote {path}")
    for figure in report.figures:
        print(f"{figure.name}: {figure.ours}")
    return report


if __name__ == "__main__":
    main()
