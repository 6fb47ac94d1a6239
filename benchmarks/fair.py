"""The fair protocol of the quality studies (Q3, Q4, Q6): equal tuning budget, validation split.

Every entry — one of our methods or a peer library — has its library `default`
configuration and a `grid` of exactly `BUDGET` configurations. The study's points (queries,
or training rows for self-influence) are split once, by a seed, into `validation` and
`evaluated` points that never overlap. An entry's tuned configuration is the grid point
with the best statistic on the validation points (ties: the earlier point); it and the
default are then reported on the evaluated points only, in separate columns. Nothing
chosen on evaluated points is reported as a result.

`Entry.run(config)` scores all points at once, `[P, ...]` with dim 0 the points (a query's
row of scores against every training row, or one row's self-influence), so a
configuration costs one call; the study's `statistic(scores, points)` maps the scores of
some points (and their indices, to look up copies, labels or retrained losses) to one
number, higher is better (top-1 rate, mean LDS, AUC). The paired bootstrap
(`attribution.evaluation.paired_bootstrap`) resamples evaluated points — the same ones for
both sides — for the difference between our default and the best entry.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attribution.evaluation import PairedDifference, mean_difference, paired_bootstrap
from benchmarks.peers import Peer, PeerProblem, available
from benchmarks.report import Report

BUDGET = 4  # configurations per entry, ours and the peers' alike
SPLIT_SEED = 0
SPLIT_SALT = 7919
RESAMPLES = 1000

Config = dict[str, Any]
Statistic = Callable[[Tensor, Tensor], float]  # (scores of some points [M, ...], their indices [M]) → value
PerPoint = Callable[[Tensor, Tensor], Tensor]  # the same → [M] values whose (nan)mean is the statistic


@dataclass(frozen=True)
class Points:
    """Indices (dim 0 of every entry's scores) of the validation and the evaluated points."""

    validation: Tensor
    evaluated: Tensor

    @classmethod
    def split(cls, num_points: int, num_validation: int, seed: int = SPLIT_SEED) -> Points:
        # Salted: a study's own seed-0 permutations (label flips, leaked rows) must not coincide with the split.
        order = torch.randperm(num_points, generator=torch.Generator().manual_seed(SPLIT_SALT + seed))
        return cls(order[:num_validation].sort().values, order[num_validation:].sort().values)


@dataclass(frozen=True)
class Entry:
    label: str
    owner: str  # "ours" or the peer's package
    default: Config
    grid: tuple[Config, ...]
    run: Callable[[Config], Tensor]
    cannot: str = ""  # set: the entry is not run, the report says why
    whole_space: bool = False  # the grid is every configuration the entry has (fewer than BUDGET)
    service_default: bool = False  # the answer the service gives with no method and no params (`auto`)
    checkpoints: bool = False  # given the training checkpoints (ours; peers say so per config)
    final_model_only: bool = False  # the answer for users who registered no checkpoints (audits)

    def __post_init__(self) -> None:
        if self.cannot:
            return
        if len(self.grid) != BUDGET and not (self.whole_space and len(self.grid) < BUDGET):
            raise ValueError(f"{self.label}: grid has {len(self.grid)} configurations, the budget is {BUDGET}")


@dataclass
class Outcome:
    entry: Entry
    default_value: float = math.nan
    tuned: Config | None = None
    tuned_validation: float = math.nan
    tuned_value: float = math.nan
    scores: dict[str, Tensor] = field(default_factory=dict)  # "default" / "tuned" → scores of all points
    errors: dict[str, str] = field(default_factory=dict)  # config key → error line
    validation: dict[str, float] = field(default_factory=dict)  # config description → validation value


def key(config: Config) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def describe(config: Config | None) -> str:
    if config is None:
        return "—"
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "(defaults)"


def evaluate(entry: Entry, points: Points, statistic: Statistic,
             progress: Callable[[str], None] = lambda _: None) -> Outcome:
    """Default and validation-tuned configuration of `entry`, each measured on the evaluated points."""
    outcome = Outcome(entry)
    if entry.cannot:
        return outcome
    computed: dict[str, Tensor] = {}

    def scores(config: Config) -> Tensor | None:
        k = key(config)
        if k not in computed and k not in outcome.errors:
            progress(f"{entry.label} {describe(config)}")
            try:
                computed[k] = entry.run(config).detach().cpu()
            except Exception as exc:
                outcome.errors[k] = traceback.format_exception_only(exc)[-1].strip()[:200]
        return computed.get(k)

    def value(all_scores: Tensor, index: Tensor) -> float:
        chosen = all_scores[index]
        return statistic(chosen, index) if bool(torch.isfinite(chosen).all()) else math.nan

    default = scores(entry.default)
    if default is not None:
        outcome.default_value = value(default, points.evaluated)
        outcome.scores["default"] = default
    for config in entry.grid:
        s = scores(config)
        if s is None:
            continue
        v = value(s, points.validation)
        outcome.validation[describe(config)] = v
        if not math.isnan(v) and (math.isnan(outcome.tuned_validation) or v > outcome.tuned_validation):
            outcome.tuned, outcome.tuned_validation = config, v
    if outcome.tuned is not None:
        tuned = computed[key(outcome.tuned)]
        outcome.tuned_value = value(tuned, points.evaluated)
        outcome.scores["tuned"] = tuned
    return outcome


def uses_checkpoints(outcome: Outcome, kind: str) -> bool:
    """Whether the `kind` column ("default"/"tuned") of `outcome` used the training checkpoints."""
    config = outcome.entry.default if kind == "default" else outcome.tuned
    return outcome.entry.checkpoints or (config or {}).get("checkpoints") == "all"


def versus_best(ours: Outcome, outcomes: list[Outcome], points: Points, statistic: Statistic,
                per_point: PerPoint | None = None, seed: int = 0,
                final_model_only: bool = False) -> tuple[str, PairedDifference] | None:
    """Paired bootstrap of our default minus the best column (default or tuned) of any entry,
    over the evaluated points; None if our default did not run. With `per_point` (a statistic
    that is a mean over points: top-1 rate, mean LDS) the per-point values are computed once
    and their means resampled (`mean_difference`, the same draws and numbers, much faster).
    `final_model_only`: only columns that did not use the training checkpoints compete (the
    answer for a user who registered none)."""
    if "default" not in ours.scores:
        return None
    columns = [(f"{o.entry.label} ({kind})", o.scores[kind], o.default_value if kind == "default" else o.tuned_value)
               for o in outcomes for kind in ("default", "tuned")
               if kind in o.scores and not (final_model_only and uses_checkpoints(o, kind))]
    columns = [c for c in columns if not math.isnan(c[2])]
    name, best, _ = max(columns, key=lambda c: c[2])
    ev = points.evaluated
    if per_point is not None:
        return name, mean_difference(per_point(ours.scores["default"][ev], ev), per_point(best[ev], ev),
                                     resamples=RESAMPLES, seed=seed)

    def stat_of(all_scores: Tensor) -> Callable[[Tensor], float]:
        return lambda r: statistic(all_scores[ev[r]], ev[r])

    def usable(r: Tensor) -> bool:
        return not math.isnan(statistic(ours.scores["default"][ev[r]], ev[r]))

    return name, paired_bootstrap(stat_of(ours.scores["default"]), stat_of(best), len(ev), resamples=RESAMPLES,
                                  seed=seed, usable=usable)


def peer_entries(peers: list[Peer], problem: PeerProblem, *, queries: tuple[Tensor, Tensor] | None) -> list[Entry]:
    """Entries for the peers: per-query scores of `queries` `(x, y)`, or self-influence when None."""
    return [_peer_entry(peer, problem, queries) for peer in peers]


def _peer_entry(peer: Peer, problem: PeerProblem, queries: tuple[Tensor, Tensor] | None) -> Entry:
    missing = available(peer)
    run: Callable[[Config], Tensor] | None = None
    if queries is not None and peer.scores is not None:
        score_fn, (x, y) = peer.scores, queries
        run = lambda config: score_fn(problem, config, x, y)  # noqa: E731
    elif queries is None and peer.self_influence is not None:
        self_fn = peer.self_influence
        run = lambda config: self_fn(problem, config)  # noqa: E731
    if missing or run is None:
        return Entry(peer.label, peer.package, peer.default, peer.grid, lambda _: torch.empty(0),
                     missing or peer.cannot)
    return Entry(peer.label, peer.package, peer.default, peer.grid, run)


def write_tables(report: Report, title: str, outcomes: list[Outcome], metric: str) -> None:
    """The side-by-side table (library defaults | tuned on validation) and the failures."""
    rows = []
    for o in outcomes:
        if o.entry.cannot:
            rows.append([o.entry.label, o.entry.owner, "not run", "—", "—", "—", o.entry.cannot])
            continue
        failed = "; ".join(f"{k}: {v}" for k, v in o.errors.items()).replace("|", "/")
        chosen = describe(o.tuned) + (f" (of {len(o.entry.grid)}: every configuration)" if o.entry.whole_space else "")
        rows.append([o.entry.label, o.entry.owner, _fmt(o.default_value), chosen,
                     _fmt(o.tuned_validation), _fmt(o.tuned_value), failed or ""])
    report.table(title, ["entry", "library", f"{metric}, library defaults", f"tuned: chosen config (of {BUDGET})",
                         f"{metric} on validation", f"{metric}, tuned", "failed configurations"], rows)
    report.table(f"{title}: {metric} of every configuration on the validation points (what chose the tuned column)",
                 ["entry", "configuration: validation value"],
                 [[o.entry.label, "; ".join(f"{c}: {_fmt(v)}" for c, v in o.validation.items())]
                  for o in outcomes if o.validation])


def bootstrap_figures(report: Report, tag: str, outcomes: list[Outcome], points: Points, statistic: Statistic,
                      metric: str, per_point: PerPoint | None = None) -> dict[str, tuple[str, PairedDifference]]:
    """A figure per our method: its default minus the best column, with the 95% interval. The
    target (first or tied) applies to the service's default answer (`service_default` entries)
    when the study has them, else to every method's defaults; the other rows are informational
    (a named method's defaults may serve another question, e.g. relative scores on Q6)."""
    out = {}
    targeted = [o for o in outcomes if o.entry.service_default] or [o for o in outcomes if o.entry.owner == "ours"]
    for o in outcomes:
        if o.entry.owner != "ours":
            continue
        # the audit answer without checkpoints competes with what runs without them
        final_only = o.entry.final_model_only and any(
            uses_checkpoints(other, kind) for other in outcomes for kind in other.scores)
        result = versus_best(o, outcomes, points, statistic, per_point, final_model_only=final_only)
        if result is None:
            if o.entry.service_default:  # the answer users get failed: a missed target, not a gap
                error = next(iter(o.errors.values()), "no scores")
                report.figure(f"{tag}: {o.entry.label} default {metric}", f"did not run ({error})", "—", "this run",
                              "best or tied", False)
            continue
        best, diff = result
        out[o.entry.label] = result
        verdict = "tied (interval includes 0)" if not diff.significant else ("ahead" if diff.low > 0 else "behind")
        target = o in targeted
        versus = f"best final-model entry ({best})" if final_only else f"best ({best})"
        report.figure(f"{tag}: {o.entry.label} default {metric} {_fmt(o.default_value)} − {versus}",
                      f"{diff.difference:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}] {verdict}", "—", "this run",
                      "best or tied" if target else "— (a named method's defaults)",
                      (not diff.high < 0) if target else None)
    return out


def protocol_text(points: Points, seeds: str) -> str:
    return (f"Fair protocol (`benchmarks/fair.py`): each entry, ours and the peers', is reported with its library "
            f"defaults and tuned with the same budget of {BUDGET} configurations, chosen on {len(points.validation)} "
            f"validation points disjoint from the {len(points.evaluated)} evaluated points (split seed {SPLIT_SEED}); "
            f"both columns are measured on the evaluated points only. Intervals: paired bootstrap over evaluated "
            f"points, {RESAMPLES} resamples, 95%. Seeds: {seeds}.")


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


# Our methods' grids (BUDGET each, the library default first). Query-type studies (Q3, Q6) vary
# the score normalisation (the default is "relative" for forward_inf, influence, tracin and trak;
# "none" is the raw score) and each method's main knob; self-influence (Q4) has no normalisation.
RAW = {"normalize": "none"}
QUERY_GRIDS: dict[str, tuple[Config, ...]] = {
    "forward_inf": ({}, RAW, {"auto": True}, {"unlearning": "newton"}),
    "influence": ({}, RAW, {"ihvp": "ekfac"}, {"ihvp": "ekfac", **RAW}),
    # tracin's default is the last layer on classifiers (TracInParams.for_task): the grid varies to every layer
    "tracin": ({}, RAW, {"last_layer": False}, {"last_layer": False, **RAW}),
    "trak": ({}, RAW, {"projection_dim": 512}, {"projection_dim": 512, **RAW}),
    "gradient_similarity": ({}, {"similarity": "dot"}, {"similarity": "dot", "normalize": "relative"},
                            {"last_layer": True}),
}
# `method: "auto"` has one setting for queries about predictions, the question (`goal`): its
# whole configuration space, below the budget. Q3 (retrieval) reports its default, Q6 (LDS) the
# counterfactual goal as the default a user asking that question sends.
AUTO_GOALS: tuple[Config, ...] = ({"goal": "retrieve"}, {"goal": "counterfactual"})


def auto_entry(default: Config, run: Callable[[Config], Tensor]) -> Entry:
    """The `auto` entry of a query study with `default` as its library-defaults column."""
    label = "auto" + "".join(f", {k}={v}" for k, v in default.items())
    return Entry(label, "ours", default, AUTO_GOALS, run, whole_space=True, service_default=True)


def auto_audit_entry(label: str, run: Callable[[Config], Tensor], *, checkpoints: bool) -> Entry:
    """The `auto` entry of a self-influence study: no setting to tune (what was registered —
    the checkpoints in `run`'s context, if `checkpoints` — decides)."""
    return Entry(label, "ours", {}, ({},), run, whole_space=True, service_default=True, checkpoints=checkpoints,
                 final_model_only=not checkpoints)


# Not run in the query studies: its default path refits the exact curvature K − 1 = 4 times per query.
QUERY_SKIPPED = {"integrated_influence": "refits the (exact, default) curvature 4 times per query: minutes per query "
                                         "at this size on the shared 2-core machine; not run in this session"}
SELF_GRIDS: dict[str, tuple[Config, ...]] = {
    "forward_inf": ({}, {"self_influence_mode": "gradient_norm"}, {"steps": 5, "lr": 0.01},
                    {"unlearning": "newton"}),
    "influence": ({}, {"ihvp": "ekfac"}, {"damping": 1e-3}, {"damping": 1.0}),
    "tracin": ({}, {"last_layer": False}, {"last_layer": False, "projection_dim": 512}, {"projection_dim": 64}),
    "trak": ({}, {"projection_dim": 512}, {"use_margin": False}, {"damping": 1.0}),
    "gradient_similarity": ({}, {"similarity": "dot"}, {"last_layer": True}, {"similarity": "dot", "last_layer": True}),
    "integrated_influence": ({}, {"ihvp": "ekfac"}, {"steps": 2}, {"reg": 0.1}),
}
