#!/usr/bin/env bash
# docker/context-files.sh: the Docker build context of docker/ci.sh, as NUL-separated paths relative
# to the repository root: the files git tracks (their working-tree contents), and nothing else.
# Untracked files, ignored or not (a scratch script, a checkpoint, a tool's cache), never reach the
# image, so the same commit builds the same image whatever else lies in the checkout. Tracked files
# deleted in the working tree, and wheels (docker/ci.sh adds the wheelhouse itself), are left out.
set -euo pipefail
cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}"
git rev-parse --git-dir >/dev/null 2>&1 || { echo "$(pwd) is not a git checkout" >&2; exit 1; }
git ls-files -z --cached | while IFS= read -r -d '' f; do
    if [ -e "$f" ] && [[ "$f" != docker/wheelhouse/*.whl ]]; then printf '%s\0' "$f"; fi
done
