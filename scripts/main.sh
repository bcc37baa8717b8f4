#!/usr/bin/env bash
# The main job: set-up, then `python -m maskformer_fast` on its built-in default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m maskformer_fast "$@"
