"""The code version a process runs: the installed package's version and, when known, the
source commit (`SOURCE_COMMIT` in the environment, e.g. set at image build, else `git
rev-parse HEAD` of the checkout the code runs from). Read once per process."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGE = "attribution-service"
COMMIT_ENV = "SOURCE_COMMIT"


@cache
def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def source_commit() -> str | None:
    """The commit hash of the running code, or None when neither the environment nor git tells."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None
