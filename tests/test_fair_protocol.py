"""`benchmarks/fair.py`: the first-or-tied target applies to the service's default answer (the
`auto` entries), a named method's defaults are informational, and `auto` without checkpoints
competes only with columns that did not use them."""

from __future__ import annotations

import torch

from benchmarks.fair import Entry, Points, auto_audit_entry, auto_entry, bootstrap_figures, evaluate
from benchmarks.report import Report


def _mean(scores: torch.Tensor, _: torch.Tensor) -> float:
    return float(scores.mean())


def _constant(value: float) -> Entry:
    return Entry(f"ours {value}", "ours", {}, ({},) * 4, lambda _: torch.full((20,), value))


def test_only_the_service_default_carries_the_target_and_final_model_auto_ignores_checkpoint_columns() -> None:
    points = Points.split(20, 5)
    entries = [
        auto_audit_entry("auto (checkpoints)", lambda _: torch.full((20,), 0.9), checkpoints=True),
        auto_audit_entry("auto (final model only)", lambda _: torch.full((20,), 0.7), checkpoints=False),
        Entry("tracin", "ours", {}, ({},) * 4, lambda _: torch.full((20,), 0.8), checkpoints=True),
        _constant(0.5),
        Entry("peer", "peer", {"checkpoints": "all"}, ({"checkpoints": "all"},) * 4, lambda _: torch.ones(20)),
        Entry("peer final", "peer", {"checkpoints": "final"}, ({"checkpoints": "final"},) * 4,
              lambda _: torch.full((20,), 0.6)),
    ]
    outcomes = [evaluate(e, points, _mean) for e in entries]
    report = Report("t", "t", quick=True)
    bootstrap_figures(report, "m", outcomes, points, _mean, "stat")
    by_entry = {f.name.split(" default")[0].removeprefix("m: "): f for f in report.figures}
    assert by_entry["auto (checkpoints)"].met is False  # behind the peer's checkpoint column (1.0)
    assert "peer (default)" in by_entry["auto (checkpoints)"].name
    final = by_entry["auto (final model only)"]
    assert final.met is True and "best final-model entry (auto (final model only) (default))" in final.name
    assert by_entry["tracin"].met is None and by_entry["ours 0.5"].met is None  # informational


def test_a_query_studys_auto_entry_competes_with_every_column() -> None:
    points = Points.split(20, 5)
    entries = [auto_entry({}, lambda _: torch.full((20,), 0.7)),
               Entry("tracin", "ours", {}, ({},) * 4, lambda _: torch.full((20,), 0.8), checkpoints=True)]
    outcomes = [evaluate(e, points, _mean) for e in entries]
    report = Report("t", "t", quick=True)
    bootstrap_figures(report, "m", outcomes, points, _mean, "stat")
    assert report.figures[0].met is False and "best (tracin (default))" in report.figures[0].name


def test_a_study_without_auto_entries_targets_every_method_default() -> None:
    points = Points.split(20, 5)
    outcomes = [evaluate(e, points, _mean) for e in (_constant(0.5), _constant(0.7))]
    report = Report("t", "t", quick=True)
    bootstrap_figures(report, "m", outcomes, points, _mean, "stat")
    assert [f.met for f in report.figures] == [False, True]


def test_a_service_default_that_fails_is_a_missed_target() -> None:
    def broken(_: object) -> torch.Tensor:
        raise RuntimeError("boom")

    points = Points.split(20, 5)
    outcomes = [evaluate(e, points, _mean) for e in (auto_audit_entry("auto", broken, checkpoints=False),
                                                      _constant(0.5))]
    report = Report("t", "t", quick=True)
    bootstrap_figures(report, "m", outcomes, points, _mean, "stat")
    failed = report.figures[0]
    assert failed.met is False and "boom" in str(failed.ours)
