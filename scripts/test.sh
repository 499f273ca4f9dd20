#!/usr/bin/env bash
# Set up (idempotently: the test extras and data) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec ${PYTHON:-python3} -m pytest -q "$@"
