#!/usr/bin/env bash
# The main job: set-up, then `maskformer-fast train` on the built-in "squares" data
# (evaluation and figures in runs/squares/). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m maskformer_fast "$@"
