#!/usr/bin/env bash
# Creates .venv (if missing) and installs capaboost-fx with everything the demo and tests use.
# torch is pinned to 2.13.0: on this project's machines that pin is the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
