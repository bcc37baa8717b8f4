#!/usr/bin/env bash
# Set-up of a fresh machine, idempotent: a virtualenv (.venv) with the CUDA 13.0 build of
# torch (torch==2.14.1, from this machine's disk), the dependencies of the library, the
# trainer and the tests (the extras train and test), and maskformer_fast built in place
# (C++ always; CUDA when nvcc is found, for sm_80/86/89/90 + PTX: setup.py's defaults, as
# for CUDA_HOME, unless TORCH_CUDA_ARCH_LIST or CUDA_HOME say otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check torch==2.14.1
# The build's own requirements (pyproject.toml), which --no-build-isolation leaves to us.
"$PY" -m pip install -q --disable-pip-version-check setuptools wheel ninja
export MAX_JOBS=${MAX_JOBS:-2}
mkdir -p build
# The compiler's resource report (registers, spills per kernel) stays in build/build.log.
"$PY" -m pip install -v --disable-pip-version-check --no-build-isolation -e ".[train,test]" \
  > build/build.log 2>&1 || { tail -n 60 build/build.log; exit 1; }
grep -E "ptxas info|spill" build/build.log > build/ptxas.log || true
"$PY" - <<'PY'
import torch
from maskformer_fast.hungarian import compiled_backends
kernels = compiled_backends()
print(f"maskformer_fast built: torch {torch.__version__}, cpu kernel {'cpu' in kernels}, "
      f"cuda kernel {'cuda' in kernels}")
PY
