#!/usr/bin/env bash
# Fails when protos/ breaks the contract as it was at a git ref (default: the previous commit),
# so that clients generated from the old contract keep working. Run by `make lint` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ref="${1:-HEAD~1}"
buf="${BUF:-.tools/node_modules/.bin/buf}"
if ! git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
  echo "buf breaking: no commit $ref to compare with (a first commit or a shallow clone); skipped"
  exit 0
fi
if [ -z "$(git ls-tree -r --name-only "$ref" -- protos buf.yaml)" ]; then
  echo "buf breaking: $ref has no contract yet; nothing to break"
  exit 0
fi
"$buf" breaking --against ".git#ref=$ref"
echo "buf breaking: protos/ is compatible with $ref"
