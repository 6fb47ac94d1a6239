"""Committed benchmark reports describe the current code, and the README quotes only their figures.

Each `benchmarks/results/<study>.md` records the `code_sha` of the code it measured
(`benchmarks/provenance.py`); a report whose sha no longer matches fails here until it is
regenerated, or explicitly marked `code_sha: stale (...)`. Every figure the README's
benchmark section quotes (numbers with a decimal point, a % or a ×) must appear, at the
README's precision, in some committed report.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.provenance import ROOT, STALE, code_sha, recorded_sha

RESULTS = ROOT / "benchmarks" / "results"
REPORTS = sorted(RESULTS.glob("*.md"))
_NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s*(%|×)?")


def _numbers(text: str) -> set[tuple[float, int]]:
    """Every number in `text` as (value, decimals)."""
    out = set()
    for match in _NUMBER.finditer(text):
        raw = match.group(1).replace(",", "")
        out.add((float(raw), len(raw.split(".")[1]) if "." in raw else 0))
    return out


def _figures(text: str) -> list[str]:
    """Quoted figures of a README section: decimals, percentages and ratios."""
    return [m.group(0).strip() for m in _NUMBER.finditer(text) if "." in m.group(1) or m.group(2)]


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.stem)
def test_report_code_sha_matches_the_code(report: Path) -> None:
    recorded = recorded_sha(report.read_text())
    assert recorded is not None, f"{report.name} records no code_sha; regenerate it or mark it `code_sha: stale (why)`"
    if recorded != STALE:
        assert recorded == code_sha(report.stem), (
            f"{report.name} was measured on other code (code_sha {recorded}, now {code_sha(report.stem)}): "
            f"regenerate it with `python -m benchmarks.{report.stem}` or mark it stale")


def test_readme_figures_come_from_reports() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Benchmarks"):]
    known = set()
    for report in REPORTS:
        known |= _numbers(report.read_text())
    missing = []
    for figure in _figures(section):
        raw = _NUMBER.match(figure)
        assert raw is not None
        value = float(raw.group(1).replace(",", ""))
        decimals = len(raw.group(1).split(".")[1]) if "." in raw.group(1) else 0
        if not any(round(v, decimals) == value for v, d in known if d >= decimals):
            missing.append(figure)
    assert not missing, f"README figures found in no committed report: {missing}"
