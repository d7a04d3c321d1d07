#!/usr/bin/env bash
# Builds this client and runs its end-to-end tests (npm test) against a real metalake server
# started for the purpose: the repository's .venv, an empty temporary data directory, a free
# port. Exits non-zero if anything fails; the server's log is shown when it does.
# Needs Node.js 18+ with npm, and the server installed (`make install` at the repository root).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="$repo/.venv/bin/python"
[ -x "$python" ] || { echo "run-ci.sh: $python not found: run 'make install' first" >&2; exit 1; }

cd "$here"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build

scratch="$(mktemp -d)"
log="$scratch/server.log"
server=""
stop_server() {
  status=$?
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    # It drains for a moment on SIGTERM; do not wait for ever.
    for _ in $(seq 1 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -s "$log" ]; then
    echo "---- metalake server log ----" >&2
    tail -n 200 "$log" >&2
  fi
  rm -rf "$scratch"
  exit "$status"
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# The server reads its settings from the environment; PYTHONPATH makes `-m server` resolve to
# this checkout's server package whatever the caller's directory.
METALAKE_DATA_DIR="$scratch/data" METALAKE_LISTEN=127.0.0.1:0 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" -m server 2>"$log" >&2 &
server=$!

port=""
for _ in $(seq 1 600); do # up to 60 s
  port="$(sed -n 's/.*metalake serving on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)"
  [ -n "$port" ] && break
  kill -0 "$server" 2>/dev/null || { echo "run-ci.sh: the server exited before serving" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "run-ci.sh: the server did not start serving within 60 s" >&2; exit 1; }
echo "run-ci.sh: metalake serving on 127.0.0.1:$port"

METALAKE_TARGET="127.0.0.1:$port" npm test
