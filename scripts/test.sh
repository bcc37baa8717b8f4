#!/usr/bin/env bash
# The test command: set-up, then the test suite, then every benchmark once as a test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
"$PY" -m pytest tests -q -p no:cacheprovider "$@"
"$PY" -m pytest benchmarks --benchmark-disable -q -p no:cacheprovider
bash scripts/sanitize.sh
