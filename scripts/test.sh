#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The layering of ARCHITECTURE.md (an import-linter contract in pyproject.toml): seconds.
.venv/bin/lint-imports --no-cache > /dev/null || { .venv/bin/lint-imports --no-cache; exit 1; }
# The docs site, warnings as errors (broken links, docstrings that do not fit signatures).
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "${TMPDIR:-/tmp}/capaboost-site"
# Two pytest-xdist workers (the CI machine has two cores; TEST_WORKERS overrides, 0 = none),
# whole files per worker so that module-scoped fixtures are built once, handed out longest
# first (the order tests/conftest.py gives; xdist's own reorder is switched off).
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
