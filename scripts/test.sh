#!/usr/bin/env bash
# The README's test command: set up .venv, start Postgres/Redis if they are down, create the
# test database, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# Headless Chromium for the result-page test (tests/surface/test_result_page_chromium.py):
# Debian's package, installed once when missing (root and apt-get only; else the test skips
# outside CI).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (apt-get) for the result-page test"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
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
