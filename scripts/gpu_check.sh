#!/usr/bin/env bash
# The checks that need a GPU, in one prepared run on a fresh, offline machine with its own
# python3, torch and Triton (no venv, no network), from the repository root:
#
#   LIMIT=540 OUT=/some/dir bash scripts/gpu_check.sh [PHASES]
#
# PHASES (default: all but sweep, in this order): build solver pytest detr kernels train sweep
# sanitize. TRAIN_ARGS: extra arguments for the training run.
# Wheels in .whl/ (torch-linear-assignment, pycocotools) are installed into /tmp/site first.
# Each phase has a time cap within LIMIT seconds; logs go to $OUT (at most 8 files), and a
# summary prints last.
set -uo pipefail
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0
export MASKFORMER_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
PY=python3 OUT=${OUT:-$PWD/gpu_logs} LIMIT=${LIMIT:-540}
PHASES=" ${*:-build solver pytest detr kernels train sanitize} " SUM=""
mkdir -p "$OUT"
has() { [[ "$PHASES" == *" $1 "* ]]; }
# run NAME CAP LOG CMD...: CMD under min(CAP, time left) seconds, its output appended to LOG.
run() {
  local name=$1 cap=$2 log=$3 t rc; shift 3
  t=$((LIMIT - SECONDS - 5)); ((t > cap)) && t=$cap
  ((t < 20)) && { SUM+="$name: skipped (time)\n"; return 1; }
  echo "== $name (cap ${t}s, at ${SECONDS}s)"
  echo "== $name: $*" >> "$OUT/$log"
  timeout -k 5 "$t" "$@" >> "$OUT/$log" 2>&1; rc=$?
  SUM+="$name: rc=$rc, done at ${SECONDS}s\n"; return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  grep -m1 "model name" /proc/cpuinfo; nproc
  $PY -c "import sys, torch, triton; p = torch.cuda.get_device_properties(0)
print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, p.name,
      p.multi_processor_count, 'SMs, smem optin', p.shared_memory_per_block_optin)"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 1; command -v ninja cuobjdump compute-sanitizer
} > "$OUT/build.log" 2>&1
cat "$OUT/build.log"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SO=maskformer_fast/_C$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

if has build && [ ! -f "$SO" ]; then
  run build 240 build.log $PY setup.py build_ext --inplace || { tail -n 40 "$OUT/build.log"; echo -e "$SUM"; exit 1; }
  { echo "== resources (sm_90)"; cuobjdump --dump-resource-usage "$SO" | grep -A1 "lsa_.*kernel" | head -n 40
    echo "== SASS of the float32 warp kernel"
    cuobjdump -sass -fun _ZN3lsa4cuda15lsa_warp_kernelIfEEvNS0_5BatchENS0_4PlanEPc "$SO"; } >> "$OUT/build.log" 2>&1
fi
[ -f "$SO" ] || { echo "no $SO"; echo -e "$SUM"; exit 1; }

has solver && run solver 120 solver.log $PY scripts/gpu_solver_check.py --out "$OUT"
XDIST=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4")
has pytest && run pytest 100 pytest.log $PY -m pytest -q -p no:cacheprovider -m cuda $XDIST -rfE \
  tests/test_cuda.py tests/test_kernels_cuda.py tests/test_kernels_reference.py tests/test_matcher.py \
  tests/test_pairs_and_splits.py
has detr && run detr 60 detr.log $PY scripts/gpu_detr_check.py --out "$OUT"
has kernels && run kernels 120 kernels.log $PY scripts/gpu_kernels_check.py --out "$OUT" --budget 100
if has train; then
  rm -rf /tmp/squares_gpu
  run train 80 train.log $PY -m maskformer_fast train --device cuda --out /tmp/squares_gpu ${TRAIN_ARGS:-}
  cat /tmp/squares_gpu/metrics.json >> "$OUT/train.log" 2>/dev/null
fi
has sweep && run sweep 90 kernels.log $PY scripts/gpu_cost_sweep.py
if has sanitize; then
  for tool in memcheck racecheck; do
    run "sanitizer $tool" 45 pytest.log compute-sanitizer --tool $tool --error-exitcode 9 \
      --report-api-errors no $PY -c "
import torch
from maskformer_fast.hungarian import index_pairs
D = torch.ops.maskformer_fast.lsa_duals
g = torch.Generator().manual_seed(1)
for B, N, M, lanes in [(4, 20, 30, 1), (3, 30, 20, 32), (2, 40, 300, 64), (1, 60, 600, 512), (1, 3, 1100, 1)]:
    c = torch.rand(B, N, M, generator=g)
    c[0, 0, 0] = float('nan') if B > 2 else c[0, 0, 0]
    got, want = D(c.cuda(), None, False, lanes), D(c, None, False, 1)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), (B, N, M, lanes)
c, s = torch.rand(5, 40, 60, generator=g), torch.tensor([0, 7, 20, 33, 0])  # DETR's layout
got, want = D(c.cuda(), None, False, 1, col_splits=s.cuda()), D(c, None, False, 1, col_splits=s)
assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), 'col_splits'
pairs = index_pairs(got[0])
assert all(torch.equal(r.cpu(), q) for p, w in zip(pairs, index_pairs(want[0])) for r, q in zip(p, w))
print('sanitized corpus: CUDA == CPU')"
  done
fi
for f in solver pytest detr kernels train; do
  [ -f "$OUT/$f.log" ] && { echo "--- $f"; tail -n 30 "$OUT/$f.log"; }
done
echo -e "== summary ($SECONDS s)\n$SUM"
