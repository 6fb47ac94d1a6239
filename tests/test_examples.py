"""The bundled examples run as the README tells a newcomer: build the data, start
`python -m service` on the embedded default, run the example's queries over HTTP."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.testing import REPO_ROOT, ServiceProcesses, child_env

pytestmark = pytest.mark.slow


def _example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / name), *args], env=child_env({}),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_digits_demo_finds_every_leaked_point(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _example("digits_demo.py", "build", str(root))
    with ServiceProcesses({"DATA_ROOT": str(root)}) as running:
        out = _example("digits_demo.py", "query", running.url, str(root))
    assert "leaked copies ranked first: 5/5" in out


def test_language_model_demo_answers_with_training_text(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _example("lm_demo.py", "build", str(root))
    with ServiceProcesses({"DATA_ROOT": str(root)}) as running:
        out = _example("lm_demo.py", "query", running.url, str(root))
    found = re.search(r"questions whose first row states the fact: (\d+)/(\d+)", out)
    assert found is not None, out
    assert int(found.group(2)) == 12
    assert "#1 '" in out and "#1 None" not in out  # ranked rows are shown by their text (preview)
