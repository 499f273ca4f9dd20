#!/usr/bin/env bash
# Set up (idempotently: the test extras, the lab and data), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
${PYTHON:-python3} -m ruff check src tests lab benchmarks
${PYTHON:-python3} -m ruff format --check src tests lab benchmarks
exec ${PYTHON:-python3} -m pytest -q "$@"
