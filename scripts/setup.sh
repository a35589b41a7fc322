#!/usr/bin/env bash
# Creates .venv (if missing) and installs capaboost-fx with everything the demo and tests use.
# torch is pinned to 2.13.0: on this project's machines pip's find-links (/opt/wheels) supply
# the CPU build of it (2.13.0+cpu).
#
# Idempotent and fast when nothing changed: after a full set-up, .venv/.capaboost-setup holds a
# hash of pyproject.toml, this script, the checkout's path and the venv's Python; when it still
# matches (and the venv has torch, capaboost_fx and the console script), pip is skipped.
# FORCE_SETUP=1 forces the full set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.capaboost-setup

stamp() {
  {
    cat pyproject.toml scripts/setup.sh
    pwd -P
    .venv/bin/python -c 'import sys; print(sys.version)'
  } | sha256sum | cut -d' ' -f1
}

if [ -z "${FORCE_SETUP:-}" ] && [ -x .venv/bin/python ] && [ -x .venv/bin/capaboost-fx ] \
   && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp)" ] \
   && .venv/bin/python -c 'import importlib.metadata as md, importlib.util as u, sys
md.version("capaboost-fx")
sys.exit(any(u.find_spec(m) is None for m in ("torch", "transformers", "pytest")))' 2>/dev/null
then
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
rm -f "$STAMP"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# setuptools' "Editable installation" banner is advice for src-less layouts: not news here.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation" \
  .venv/bin/python -m pip install -q -e ".[dev]"
stamp > "$STAMP"
