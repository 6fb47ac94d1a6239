#!/usr/bin/env bash
# The README's test command: set up .venv, start Postgres/Redis if they are down, create the
# test database, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/mypy
set +e
# Two xdist workers (each with its own Postgres database and Redis db, see tests/conftest.py);
# `--dist loadfile` keeps a module's tests, and its module-scoped fixtures, on one worker.
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure for us, not a pass.
exit $status
