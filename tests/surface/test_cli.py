"""The `attribution` CLI driven from a shell script, as a CI job runs it, against the real
`python -m service` serving the digits demo: register, query with the leakage gate, show,
export in three formats, `--json` everywhere, and the documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.testing import REPO_ROOT, child_env
from tests.surface.demo import DemoService

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding `attribution`: the installed console script, or (in a checkout not
    re-installed since the entry point was added) a shim running the same `main`."""
    installed = Path(sys.executable).parent / "attribution"
    folder = tmp_path_factory.mktemp("bin")
    shim = folder / "attribution"
    target = f'exec "{installed}" "$@"' if installed.exists() else \
        f'exec "{sys.executable}" -c "from attribution_client.cli import main; main()" "$@"'
    shim.write_text(f"#!/bin/sh\n{target}\n")
    shim.chmod(0o755)
    return folder


def sh(script: str, demo: DemoService, bin_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = child_env({"ATTRIBUTION_URL": demo.url, "ATTRIBUTION_API_KEY": demo.api_key or "",
                     "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "EXAMPLE": str(demo.example)})
    return subprocess.run(["bash", "-c", f"set -u\n{script}"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["attribution"] == "attribution_client.cli:main"


def test_ci_script_registers_queries_gates_and_exports(demo: DemoService, bin_dir: Path, tmp_path: Path) -> None:
    copies = demo.queries["copy_index"]
    run = sh("""
        model=$(attribution models add digits-mlp "file://$EXAMPLE/mlp.pt" --task classification --json \
                | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        dataset=$(attribution datasets add digits "file://$EXAMPLE/train-000.npz" "file://$EXAMPLE/train-001.npz" \
                  --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        attribution models list > models.txt
        attribution datasets list --json > datasets.json
        attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --top-k 5 --param normalize=relative --wait --json > leaked.json
        query=$(python -c 'import json; print(json.load(open("leaked.json"))["id"])')
        attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --param normalize=relative --fail-if-top-score-above 1e9 > gate_pass.txt
        echo "pass=$?"
        attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --param normalize=relative --fail-if-top-score-above -1e9 --json > gate_fail.json
        echo "fail=$?"
        attribution show "$query" > show.txt
        attribution export "$query" --format csv --output scores.csv --json > export.json
        attribution export "$query" --format npy --output scores.npy
        attribution export "$query" --format parquet --output scores.parquet
        attribution show no-such-query --json > /dev/null 2> missing.txt
        echo "missing=$?"
        attribution query --model "$model" --dataset "$dataset" --params '{"steps": "many"}' \
            --samples "$EXAMPLE/queries.json" --wait > /dev/null 2> invalid.txt
        echo "invalid=$?"
        attribution --url http://127.0.0.1:9 models list 2> unreachable.txt
        echo "unreachable=$?"
        attribution export "$query" --format xlsx 2> usage.txt
        echo "usage=$?"
    """, demo, bin_dir, tmp_path)
    assert run.returncode == 0, run.stderr
    print(run.stdout, run.stderr)
    codes = dict(line.split("=") for line in run.stdout.split() if "=" in line)
    assert "Traceback" not in run.stderr, run.stderr
    assert codes == {"pass": "0", "fail": "1", "missing": "4", "invalid": "4", "unreachable": "5", "usage": "2"}, (
        codes, run.stderr)

    leaked = json.loads((tmp_path / "leaked.json").read_text())
    assert leaked["status"] == "succeeded" and leaked["result"]["top"][0]["index"] == copies[0]
    gate = json.loads((tmp_path / "gate_fail.json").read_text())["gate"]
    assert not gate["passed"] and gate["violations"][0]["index"] == copies[0]
    assert "gate passed" in (tmp_path / "gate_pass.txt").read_text()
    assert "digits-mlp" in (tmp_path / "models.txt").read_text()
    assert json.loads((tmp_path / "datasets.json").read_text())[0]["num_samples"] == 1405
    assert f"{copies[0]}" in (tmp_path / "show.txt").read_text()
    assert "query_not_found" in (tmp_path / "missing.txt").read_text()
    assert "steps" in (tmp_path / "invalid.txt").read_text()

    npy = np.load(tmp_path / "scores.npy")
    assert npy.shape == (1405,) and int(np.argmax(npy)) == copies[0]
    csv = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(csv[:, 0], np.arange(1405))
    np.testing.assert_allclose(csv[:, 1], npy, rtol=1e-6)
    table = pq.read_table(tmp_path / "scores.parquet")
    np.testing.assert_allclose(table.column("score").to_numpy(), npy, rtol=1e-6)
    assert json.loads((tmp_path / "export.json").read_text())["shape"] == [1405]


def test_query_with_stability_shows_and_exports_the_figures(demo: DemoService, bin_dir: Path, tmp_path: Path) -> None:
    run = sh("""
        model=$(attribution models add digits-mlp "file://$EXAMPLE/mlp.pt" --task classification --json \
                | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        dataset=$(attribution datasets add digits "file://$EXAMPLE/train-000.npz" "file://$EXAMPLE/train-001.npz" \
                  --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --top-k 3 --stability 4 --wait > stable.txt
        query=$(attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --top-k 3 --stability 4 --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
        attribution export "$query" --format csv --output scores.csv
        attribution export "$query" --format parquet --output scores.parquet
        attribution query --model "$model" --dataset "$dataset" --samples "$EXAMPLE/queries.json" \
            --sample-index 0 --stability 33 2> over.txt
        echo "over=$?"
    """, demo, bin_dir, tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert "over=4" in run.stdout
    assert "stability.resamples: must be at most 32" in (tmp_path / "over.txt").read_text()
    shown = (tmp_path / "stable.txt").read_text()
    assert "stability" in shown and "rank interval" in shown and "100%" in shown and "1-1" in shown
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0] == "index,score,stability,rank_low,rank_high"
    copy = demo.queries["copy_index"][0]
    assert lines[1 + copy].endswith(",1.0,1,1") and sum(not line.endswith(",,,") for line in lines[1:]) == 6
    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.column("stability").null_count == 1405 - 6 and table.column("rank_high")[copy].as_py() == 1
