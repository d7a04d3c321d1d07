#!/usr/bin/env bash
# Fails when protos/ breaks the contract as it was at a git ref, so that clients generated from
# the old contract keep working. Run by `make lint` and CI.
#
#   scripts/buf-breaking.sh              # against the previous commit, HEAD~1
#   scripts/buf-breaking.sh origin/main  # against any commit, branch or tag (on a pull request:
#                                        # the branch it will merge into)
#
# The old protos/ is exported with `git archive` into a temporary directory and buf compares
# with that, using this checkout's buf.yaml rules. (buf's own `.git#ref=...` input clones the
# repository to a depth of 50 and fails on older refs and in some worktrees.) In a shallow clone
# (CI checkouts often are: fetch-depth 1) the script deepens it to reach the ref, and fails,
# rather than passing unchecked, if it cannot. BUF names the buf binary (default: `make buf`'s).
set -euo pipefail
cd "$(dirname "$0")/.."
ref="${1:-HEAD~1}"
buf="${BUF:-.tools/node_modules/.bin/buf}"
[ -x "$buf" ] || command -v "$buf" >/dev/null || {
  echo "buf breaking: $buf not found: run 'make buf' (or set BUF)" >&2
  exit 1
}

resolves() { git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; }

if ! resolves && [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "buf breaking: $ref is not in this shallow clone; fetching more history"
  git fetch --quiet --deepen=50 2>/dev/null || true
fi
if ! resolves; then
  if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
    echo "buf breaking: cannot reach $ref in this shallow clone: fetch more history" \
      "(git fetch --deepen=N, or fetch-depth: 0 in CI)" >&2
    exit 1
  fi
  # A full history without the ref: HEAD~N past the first commit means nothing to compare.
  if [[ "$ref" =~ ^HEAD[~^] ]] && git rev-parse --verify --quiet HEAD >/dev/null; then
    echo "buf breaking: $ref does not exist (the history is shorter); nothing to compare"
    exit 0
  fi
  echo "buf breaking: unknown git ref $ref" >&2
  exit 1
fi

commit="$(git rev-parse --verify "$ref^{commit}")"
if [ -z "$(git ls-tree -r --name-only "$commit" -- protos)" ]; then
  echo "buf breaking: $ref ($commit) has no protos/ yet; nothing to break"
  exit 0
fi

against="$(mktemp -d)"
trap 'rm -rf "$against"' EXIT
git archive "$commit" protos | tar -x -C "$against"
# protos/ is the module root (buf.yaml: modules: [path: protos]); a buf.yaml of its own pins it
# there, whatever lies above the temporary directory. The rules are this checkout's.
printf 'version: v2\n' >"$against/protos/buf.yaml"
"$buf" breaking --against "$against/protos"
echo "buf breaking: protos/ is compatible with $ref ($commit)"
