# Which C++ errors of the extension crash the process (diagnostic; a backtrace with gdb).
export PYTHONPATH=$PWD
L="torch.ops.maskformer_fast"
for case in "$L.lsa(c, None, False, True)" "$L.lsa(c[0], None, False, False)" \
    "$L.lsa_duals(c, None, False, 3)" "$L.lsa(c, s, False, False, s[:, 0].contiguous())" \
    "$L.lsa(c[0].cpu(), None, False, False)" "maskformer_fast._C.lsa_pairs(s[0].cpu())" \
    "$L.lsa(c.cpu(), s.cpu() * 9, False, False)"; do
  cat > /tmp/probe.py <<PY
import torch, maskformer_fast, maskformer_fast._C
c = torch.rand(4, 20, 30, device='cuda'); c[1, 3, 4] = float('nan')
s = torch.full((4, 2), 3, device='cuda')
try:
    $case
except Exception as exc:
    print(type(exc).__name__, str(exc)[:100], flush=True)
PY
  out=$(timeout 60 python3 -X faulthandler /tmp/probe.py 2>&1 | grep -v "^Extension\|^$\|Current thread\|File " | tail -n 2)
  echo "rc=$? | $case | $out"
done
if command -v gdb > /dev/null; then
  printf "import torch, maskformer_fast\nc = torch.rand(4, 20, 30, device='cuda')\ntorch.ops.maskformer_fast.lsa_duals(c, None, False, 3)\n" > /tmp/probe.py
  timeout 90 gdb -q -batch -ex run -ex bt --args python3 /tmp/probe.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | grep -A25 "SIG" | cut -c1-220
else
  echo "no gdb"
fi
