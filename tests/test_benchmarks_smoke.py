"""Smoke test of the quality studies: each runs end to end in `--quick` mode into a temporary
directory and writes a report with its results table (and its plots) there.

The figures of a quick run are not checked against the targets (the reduced protocols are
too small for that); what is checked is that every study runs the core library's methods
and evaluation toolkit through, and that the report states every figure with a verdict.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest

STUDIES = [
    "q1_mirrored_convex",
    "q2_forward_inf_target",
    "q3_leakage",
    "q4_mislabel",
    "q5_lds_linear",
    "q6_lds_neural",
    "q7_ihvp",
    "q8_lm_tracing",
    "q8_service",
    "q9_memorised",
]


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES)
def test_study_quick_mode_writes_report(study: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"benchmarks.{study}")
    report = module.main(["--quick", "--out", str(tmp_path)])

    text = (tmp_path / f"{study}.md").read_text()
    assert "quick mode" in text
    assert "## Setup" in text and "## Results" in text
    assert bool(report.timings) == ("## Time per query" in text)  # the fair-protocol studies time nothing
    assert report.figures, "a study reports at least one headline figure"
    for figure in report.figures:
        assert figure.source in text
        if isinstance(figure.ours, float):
            assert math.isfinite(figure.ours), f"{figure.name} is not a number"
        assert figure.met is None or figure.target, f"{figure.name} has a verdict but no target"
    for timing in report.timings:
        assert timing.seconds_per_query >= 0.0
    for plot in report.plots:
        assert (tmp_path / plot).stat().st_size > 1000
        assert f"]({plot})" in text
    # A quick run never touches the committed results.
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{study}.md"
    if committed.exists():
        assert "quick mode" not in committed.read_text()
