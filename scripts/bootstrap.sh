#!/usr/bin/env bash
# Creates (once per dependency set) the virtualenv and prints its path.
# The venv lives outside the clone, keyed by a hash of pyproject.toml, so new clones reuse it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
hash="$( (cat "$root/pyproject.toml"; "$python" --version) | sha256sum | cut -c1-16)"
venv="${MODELPRESS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/modelpress/venv-$hash}"

if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (first run installs PyTorch; a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # torch first and pinned, so no other package can pull a different build.
  "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" >&2
  "$venv/bin/pip" install -q -e "$root[worker,cli,test]" >&2
  touch "$venv/.complete"
fi
# Point the shared venv's editable install at this clone (cheap; no dependency resolution).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2 2>/dev/null \
  || "$venv/bin/pip" install -q --no-deps -e "$root" >&2
echo "$venv"
