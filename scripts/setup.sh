#!/usr/bin/env bash
# Create .venv (Python 3.11) and install fedlowrank with its test extras from pyproject.toml,
# pinned to the versions in constraints.txt (regenerate: pip freeze --exclude-editable > constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then echo "setup.sh: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; fi
if [ ! -x .venv/bin/python ]; then
  # torch's CUDA build alone fills ~5.5 GB of the venv: say so up front rather than after pip's ENOSPC
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((7 * 1024 * 1024)) ]; then
    echo "setup.sh: warning: only $((free_kb / 1024)) MiB free here; the venv needs about 7 GiB" >&2
  fi
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
echo "setup.sh: environment ready in .venv"
