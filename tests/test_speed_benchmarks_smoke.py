"""Smoke test of the speed studies P1–P7: each runs in `--quick` mode into a temporary
directory and writes its report. No timing assertions (timings depend on the machine);
the studies themselves check their results (shapes, statuses, identical score files)
and raise if something is wrong.

P3–P6 start `python -m service` / `python -m workers` subprocesses on the real Postgres
(bench databases `attribution_bench_*`) and Redis (databases 3–6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STUDIES = {
    "p1_sweep_efficiency": "Forward-INF throughput / plain inference throughput",
    "p8_lm_sweep": "Forward-INF tokens/s ÷ plain inference tokens/s",
    "p2_query_time": "influence (cg) warm ÷ Forward-INF warm",
    "p3_repeat_latency": "identical repeat POST, p50 ms",
    "p4_scale_out": "2 worker(s): scores identical to the 1-worker run",
    "p5_memory": "growth per extra row, bytes",
    "p6_load": "queries reaching a final status",
    "p7_feature_query": "Forward-INF wall ÷ TrackStar wall (per new query)",
    "p9_cost_estimates": "runs with predicted seconds within 2× of measured",
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_runs_in_quick_mode(study: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{study}", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / f"{study}.md").read_text()
    assert "quick mode" in report and "## Results" in report
    assert STUDIES[study] in report
    assert "every figure measured on device cpu" in report
