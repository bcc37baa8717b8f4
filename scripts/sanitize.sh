#!/usr/bin/env bash
# The C++ extension built with AddressSanitizer and UndefinedBehaviorSanitizer (CPU only,
# in a copy of the tree under build/sanitize), running the solver's parity corpus (both
# methods, tests/test_certified.py among them) and its
# bad-input tests, the index pairs and DETR splits, the solver's fuzz tests (CI's slice:
# FUZZ_EXAMPLES, default 400) and the tests of the CPU cost kernels. Fails on any sanitizer
# report. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(pwd)/${VENV:-.venv}/bin/python"
TREE=build/sanitize
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -z csrc maskformer_fast tests setup.py pyproject.toml README.md | xargs -0 cp --parents -t "$TREE"
cd "$TREE"
MASKFORMER_FAST_CUDA=0 MASKFORMER_FAST_SANITIZE=1 "$PY" setup.py build_ext --inplace > build.log 2>&1 \
  || { tail -n 40 build.log; exit 1; }
rm -f sanitizer.log.*
# The sanitizer runtimes must be loaded before Python; leaks are Python's own, not ours.
# All of test_hungarian.py; of test_fuzz.py only the solver's tests (test_fuzz_solver_*).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$(pwd)/sanitizer.log" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$(pwd)/sanitizer.log" \
PYTHONPATH=. \
  "$PY" -m pytest tests/test_hungarian.py tests/test_certified.py tests/test_pairs_and_splits.py tests/test_cpu_cost_ops.py tests/test_fuzz.py \
  -k "not test_fuzz or fuzz_solver" -q -p no:cacheprovider -s || status=$?
if ls sanitizer.log.* > /dev/null 2>&1; then
  cat sanitizer.log.*
  echo "sanitizer reports found"
  exit 1
fi
exit "${status:-0}"
