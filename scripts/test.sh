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
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure for us, not a pass.
exit $status
