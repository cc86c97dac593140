#!/usr/bin/env bash
# Install the pinned test environment (Python 3.11) and run the test suite with it.
# Usage: bash scripts/test.sh [extra pytest args]   (set COMFYUI_DIR to also run the real-ComfyUI tests)
# The test venv is the pack's .venv/ (or an existing venv/); ComfyUI's servers run with ComfyUI's own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
if [ ! -x .venv/bin/python ] && [ -x venv/bin/python ]; then
  VENV=venv
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-test.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# OpenMP threads spin-wait on a busy shared machine (steps 20-100x slower); one thread changes no result.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
set +e
"$VENV/bin/python" -m pytest -q -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
