#!/usr/bin/env bash
# The README's first command: install, build the bundled digits example, start the service
# in its embedded mode (SQLite + in-process worker, no servers needed), register the example
# over HTTP, find the leaked test points, and keep serving on http://127.0.0.1:${PORT:-8000}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DATA_ROOT="${DATA_ROOT:-$PWD/data}"
PORT="${PORT:-8000}"
unset DATABASE_URL REDIS_URL
.venv/bin/python examples/digits_demo.py build "$DATA_ROOT"
.venv/bin/python -m service --host 127.0.0.1 --port "$PORT" &
server=$!
trap 'kill $server 2>/dev/null || true' INT TERM EXIT
for _ in $(seq 1 60); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/healthz', timeout=1)" \
    >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "the service exited during start-up" >&2; exit 1; }
  sleep 0.5
done
.venv/bin/python examples/digits_demo.py query "http://127.0.0.1:$PORT" "$DATA_ROOT"
if [ "${DEMO_EXIT:-0}" = "1" ]; then exit 0; fi
echo
echo "The service keeps running at http://127.0.0.1:$PORT (API docs at /docs). Ctrl-C stops it."
wait $server
