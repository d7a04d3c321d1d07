#!/usr/bin/env bash
# Builds this client and runs its end-to-end tests against a real metalake server started for
# the purpose (the repository's .venv, an empty temporary data directory, a free port).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$here"
npm ci --no-audit --no-fund --silent
npm run --silent build

scratch="$(mktemp -d)"
log="$scratch/server.log"
METALAKE_DATA_DIR="$scratch/data" METALAKE_LISTEN=127.0.0.1:0 \
  "$repo/.venv/bin/python" -m server >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$scratch"' EXIT

for _ in $(seq 1 300); do
  port="$(sed -n 's/.*serving on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$log" | head -n 1)"
  [ -n "$port" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "${port:-}" ] || { echo "the server did not start"; cat "$log"; exit 1; }

METALAKE_TARGET="127.0.0.1:$port" npm test
